"""A checkpoint's tokenizer.json read with the `tokenizers` library alone, as transformers' AutoTokenizer reads it.

Importing transformers costs seconds (it imports torch where torch is installed); reading tokenizer.json directly
costs milliseconds. The result must be the tokenizer transformers builds, so this reader takes only the folders
where transformers itself uses tokenizer.json as it is: the `TokenizersBackend` class (`PreTrainedTokenizerFast`),
declared in tokenizer_config.json, no config.json beside it (whose model type can make transformers pick another
class), no tokenizer code (`auto_map`), and settings from the set below. `JsonTokenizer.accepts(folder)` decides from
the files alone; everything else goes to transformers (zipjax.tokenizer). What it mirrors, from transformers 5
(`TokenizersBackend.from_pretrained`):

- the backend is tokenizer.json verbatim; its post-processor adds the BOS/EOS it declares (tokenizer_config's
  add_bos_token / add_eos_token are ignored beside a tokenizer.json; no post-processor means none is added);
- the tokens of `added_tokens_decoder` (tokenizer_config, else tokenizer.json's own) are added again with their
  settings, then each named special token (bos/eos/unk/sep/pad/cls/mask) and extra special token not yet in the
  vocabulary, as a special token;
- decoding skips special tokens; `clean_up_tokenization_spaces` applies except to a BPE model (transformers skips it
  there unless forced);
- chat templates render in jinja's immutable sandbox with transformers' globals (`raise_exception`, `strftime_now`,
  `namespace`, `dict`, the `tojson` filter, the `{% generation %}` tag) and the named special tokens as variables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zipjax.errors import ZipjaxError
from zipjax.validate import json_file

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
BACKEND_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# tokenizer_config.json keys this reader honours or that change nothing it does (transformers keeps them as
# attributes: lengths, padding sides, names); a key outside these sends the folder to transformers
KNOWN_KEYS = frozenset({
    *NAMED_TOKENS, "tokenizer_class", "backend", "add_bos_token", "add_eos_token", "added_tokens_decoder",
    "chat_template", "clean_up_tokenization_spaces", "split_special_tokens", "extra_special_tokens",
    "additional_special_tokens", "model_max_length", "padding_side", "truncation_side", "model_input_names",
    "name_or_path", "processor_class", "is_local", "local_files_only", "errors", "legacy", "use_default_system_prompt",
    "add_prefix_space", "spaces_between_special_tokens", "files_loaded",
})
# files that transformers reads in ways this reader does not (a model config, legacy token files, more templates)
OTHER_FILES = ("config.json", "special_tokens_map.json", "added_tokens.json", "additional_chat_templates")
MAX_CONFIG_BYTES = 64 << 20


class JsonTokenizer:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) of a folder `accepts` took."""

    @staticmethod
    def accepts(folder: Path) -> bool:
        """Whether transformers would load this folder's tokenizer.json as it is, judged from the files present and
        tokenizer_config.json's declarations (an unreadable tokenizer_config.json is an error, not a no)."""
        if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
            return False
        if any((folder / name).exists() for name in OTHER_FILES):
            return False
        config = _config(folder)
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        return (config.get("tokenizer_class") in BACKEND_CLASSES and set(config) <= KNOWN_KEYS
                and all(_token_or_none(config.get(key)) for key in NAMED_TOKENS)
                and (extra is None or (isinstance(extra, list) and all(_token_or_none(t) for t in extra)))
                and not ("extra_special_tokens" in config and "additional_special_tokens" in config)
                and isinstance(config.get("added_tokens_decoder", {}), dict)
                and isinstance(config.get("split_special_tokens", False), bool)
                and all(config.get(key, "right") in ("right", "left") for key in ("padding_side", "truncation_side"))
                and _template_ok(config.get("chat_template")))

    def __init__(self, folder: Path):
        from tokenizers import AddedToken, Tokenizer, processors

        config = _config(folder)
        try:
            self._backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self._backend.no_truncation()  # transformers' encode neither truncates nor pads unless asked
            self._backend.no_padding()
            if self._backend.post_processor is None:
                self._backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1",
                                                                             special_tokens=[])
            decoder = _added_tokens(config, folder, AddedToken)
            self.named = _named_tokens(config, decoder, AddedToken)
            extra = [_added_token(t, AddedToken) for t in
                     config.get("extra_special_tokens", config.get("additional_special_tokens")) or []]
            self._backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
            self._backend.add_tokens(_tokens_to_add(decoder, self.named, extra, self._backend, AddedToken))
        except Exception as e:  # tokenizer.json is the user's input: a parse failure is bad input, not a zipjax bug
            lines = str(e).strip().splitlines()
            raise ZipjaxError(f"cannot load the tokenizer in {folder}: {lines[0][:300] if lines else type(e).__name__}"
                              ) from None
        self._cleanup = (bool(config.get("clean_up_tokenization_spaces", False))
                         and type(self._backend.model).__name__ != "BPE")
        self.chat_template = _chat_template(folder, config)
        self._settings = {k: v for k, v in config.items() if k not in ("added_tokens_decoder", "chat_template")}

    @property
    def eos_token_id(self) -> int | None:
        eos = self.named.get("eos_token")
        return None if eos is None else self.token_id(str(eos))

    def token_id(self, token: str) -> int | None:
        """The token's id; an unknown token is the unknown token's id (None without one), as in transformers."""
        index = self._backend.token_to_id(token)
        if index is None and token != str(self.named.get("unk_token")) and self.named.get("unk_token") is not None:
            return self._backend.token_to_id(str(self.named["unk_token"]))
        return index

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._cleanup else text

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def info(self) -> dict:
        """tokenizer_config.json's settings with the special tokens as this reader resolved them."""
        settings = {**self._settings, **{name: str(token) for name, token in self.named.items() if token is not None}}
        return settings_info(settings, self._settings.get("tokenizer_class", "TokenizersBackend"), self.chat_template)

    def chat_renderer(self, conversation: list[dict[str, str]]) -> Callable[[], str]:
        """A function rendering the chat template for `conversation` with the generation prompt, as
        apply_chat_template(..., add_generation_prompt=True, tokenize=False) does. jinja is loaded here, so the
        function (run in a bounded child, zipjax.tokenizer.render_bounded) spends its time on the template only."""
        template = self.chat_template
        if isinstance(template, dict):
            if "default" not in template:
                raise ZipjaxError("this checkpoint has several chat templates and none named default")
            template = template["default"]
        variables = {key: str(value) for key, value in self.named.items() if value is not None}
        environment = _environment()
        return lambda: render_template(template, conversation, environment, add_generation_prompt=True, **variables)


def _config(folder: Path) -> dict[str, Any]:
    config = json_file(folder / "tokenizer_config.json", "tokenizer config", max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise ZipjaxError(f"{folder / 'tokenizer_config.json'} is not a JSON object")
    return config


def _template_ok(template: Any) -> bool:
    """None, a template, {name: template}, or [{"name": ..., "template": ...}, ...] (what transformers reads)."""
    if isinstance(template, list):
        return all(isinstance(item, dict) and isinstance(item.get("name"), str)
                   and isinstance(item.get("template"), str) for item in template)
    if isinstance(template, dict):
        return all(isinstance(value, str) for value in template.values())
    return template is None or isinstance(template, str)


def _token_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, dict) and value.get("__type") == "AddedToken"
                                                       and isinstance(value.get("content"), str))


def _added_token(value: Any, added_token: type) -> Any:
    """A token as tokenizer_config.json spells it: text, or an AddedToken saved as a dict with "__type"."""
    if isinstance(value, dict):
        return added_token(**{k: v for k, v in value.items() if k != "__type"})
    return value


def _added_tokens(config: dict, folder: Path, added_token: type) -> dict[int, Any]:
    """`added_tokens_decoder`: tokenizer_config's when it has one, else tokenizer.json's added tokens."""
    if "added_tokens_decoder" in config:
        entries = {int(index): token for index, token in config["added_tokens_decoder"].items()}
    else:
        with open(folder / "tokenizer.json", encoding="utf-8") as f:
            entries = {token.pop("id"): token for token in json.load(f).get("added_tokens", [])}
    return {index: added_token(**{k: v for k, v in token.items() if k != "__type"}) for index, token in entries.items()}


def _named_tokens(config: dict, decoder: dict[int, Any], added_token: type) -> dict[str, Any]:
    """bos_token ... mask_token, each the added token of the same text when there is one (its settings win)."""
    by_text = {str(token): token for token in decoder.values()}
    named = {}
    for key in NAMED_TOKENS:
        value = _added_token(config.get(key), added_token)
        if value is not None:
            named[key] = by_text.get(str(value), value) if by_text else value
    return named


def _tokens_to_add(decoder: dict[int, Any], named: dict[str, Any], extra: list, backend, added_token: type) -> list:
    """What TokenizersBackend.__init__ adds to the backend: every token of `added_tokens_decoder` (again, with its
    settings), then the named and extra special tokens the vocabulary lacks, all marked special."""
    tokens = [token for _, token in sorted(decoder.items(), key=lambda item: item[0])]
    known = [token.content for token in backend.get_added_tokens_decoder().values()] + [str(t) for t in tokens]
    for value in [*named.values(), *extra]:
        if str(value) not in known and value not in tokens:
            tokens.append(value)
    texts = [str(t) for t in named.values()]
    out = []
    for token in tokens:
        if isinstance(token, str):
            token = added_token(token, special=True)
        elif not token.special and str(token) in texts:
            token.special = True
        out.append(token)
    return out


def _chat_template(folder: Path, config: dict) -> str | dict[str, str] | None:
    """chat_template.jinja wins over tokenizer_config's chat_template; a list of {name, template} becomes a dict."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        return {item["name"]: item["template"] for item in template}
    return template


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def render_template(template: str, messages: list[dict[str, str]], environment=None, **variables: Any) -> str:
    """`template` rendered as transformers renders a chat template (`render_jinja_template`): jinja's immutable
    sandbox, trim_blocks and lstrip_blocks, loop controls, the `{% generation %}` tag, and transformers' globals."""
    environment = environment or _environment()
    return environment.from_string(template).render(messages=messages, tools=None, documents=None, **variables)


def _environment():
    import importlib.util

    if importlib.util.find_spec("jinja2") is None:
        raise ZipjaxError("chat templates need jinja2, which is not installed: pip install 'jinja2>=3.1.6'")
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # `{% generation %}...{% endgeneration %}` renders its body
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    if tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit()) < (3, 1, 6):
        raise ZipjaxError(f"chat templates need jinja2 3.1.6 or newer (older ones have sandbox escapes), not "
                          f"{jinja2.__version__}: pip install -U jinja2")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_namespace_class(jinja2))
    return env


def _raise_exception(message):
    import jinja2.exceptions

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    from datetime import datetime

    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in a template, without the class itself (whose attributes would reach Python's internals)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _namespace_class(jinja2):
    """jinja's `namespace`, refusing attribute names that start with an underscore (as transformers does)."""

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute.")

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace

# how a process loaded a tokenizer (paths, flags), and the whole added vocabulary: not the tokenizer's settings
LOCAL_KWARGS = ("added_tokens_decoder", "name_or_path", "is_local", "local_files_only", "trust_remote_code")


def settings_info(settings: Mapping, tokenizer_class: str, chat_template) -> dict:
    """A tokenizer's settings as JSON values (AddedTokens as their text; file names and how it was loaded left out),
    with its class and chat template."""
    info = {}
    for key, value in settings.items():
        if key.endswith("_file") or key in LOCAL_KWARGS:
            continue
        value = getattr(value, "content", value)  # an AddedToken: its text
        if value is None or isinstance(value, str | int | float | bool):
            info[key] = value
    info["tokenizer_class"] = tokenizer_class
    info["chat_template"] = chat_template or None
    return info

