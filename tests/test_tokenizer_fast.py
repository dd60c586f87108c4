"""The tokenizer.json reader (zipjax.tokenizer_json) against transformers' AutoTokenizer: the same ids from encode
(with and without special tokens), the same text from decode, the same chat prompt ids, the same eos id, on the
shipped checkpoints and on tiny tokenizers built here with special tokens, BOS/EOS post-processors, add_bos_token
settings, chat templates and clean-up settings. Folders the reader leaves (another tokenizer class, a model config
beside it, no tokenizer.json) go to transformers, and a CLI-sized load of the shipped checkpoint imports no
transformers at all.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from zipjax.tokenizer import Tokenizer as ZipjaxTokenizer
from zipjax.tokenizer_json import JsonTokenizer

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = [CHECKPOINTS / "stdlib-llama", CHECKPOINTS / "digits-emu3"]
TEXTS = ["def fib(n):\n    return n", "héllo wörld 日本語 🎉", "  leading and trailing  ", "", "a.b , c ! don't",
         "<s>inside</s> and <pad> <|extra_203|>x<|image start|>", "<|im_start|>user\nhi<|im_end|>", "\t\n\r\x00"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <s> there"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c 日本"}],
]
CORPUS = ["the quick brown fox jumps over the lazy dog", "def main(): return 0", "héllo wörld, don't stop!",
          "numbers 12345 and symbols #$%", "日本語のテキスト 🎉"] * 4


def _same(folder: Path) -> None:
    """Every observable of zipjax's Tokenizer equals transformers' AutoTokenizer on `folder`."""
    ours = ZipjaxTokenizer(folder)
    ref = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    assert ours.eos_token_id == ref.eos_token_id
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
        with_all = ours.encode(text) + [i for i in (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
                                        if i is not None]
        assert ours.decode(with_all) == ref.decode(with_all, skip_special_tokens=True), text
    assert ours.has_chat_template == bool(ref.chat_template)
    if ours.has_chat_template:
        for conversation in CONVERSATIONS:
            expected = ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
            assert ours.chat(conversation) == list(expected), conversation


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_checkpoints_read_directly_match_transformers(folder):
    assert JsonTokenizer.accepts(folder)
    _same(folder)


def test_the_expert_banks_base_tokenizer_matches_transformers():
    """stdlib-experts serves on stdlib-llama (its bank holds no tokenizer): the base's tokenizer is the one used."""
    bank = CHECKPOINTS / "stdlib-experts"
    assert not any((bank / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    record = json.loads((bank / "experts.json").read_text())
    assert record["base_config"]["vocab_size"] == len(json.loads(
        (CHECKPOINTS / "stdlib-llama" / "tokenizer.json").read_text())["model"]["vocab"])
    _same(CHECKPOINTS / "stdlib-llama")


def _tiny(folder: Path, *, post: str = "bos", config: dict | None = None, kind: str = "bpe",
          template: str | None = None) -> Path:
    """A tokenizer trained here on CORPUS: `post` none / bos / bos_eos post-processor, `config` merged into a
    PreTrainedTokenizerFast tokenizer_config.json, `template` written as chat_template.jinja."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken("<tool>", special=False), AddedToken(" spaced", normalized=False)])
    if post != "none":
        single = "<s> $A" + (" </s>" if post == "bos_eos" else "")
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=single + " $B", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "pad_token": "<pad>", **(config or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
RICH = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}"
        "[SYS {{ m.content | tojson }}]{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}"
        "{% else %}[{{ ns.n }}:{{ m.role }}] {{ m.content | trim }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ dict(a=1).a }}>{% endif %}"
        "{% if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}")
VARIANTS = {
    "bos_post": dict(),
    "bos_eos_post": dict(post="bos_eos"),
    "no_post": dict(post="none"),
    "add_bos_ignored_beside_tokenizer_json": dict(post="none", config={"add_bos_token": True, "add_eos_token": True}),
    "add_bos_false_with_bos_post": dict(config={"add_bos_token": False}),
    "tokens_missing_from_vocab": dict(config={"bos_token": "<BOS>", "eos_token": "<EOS>", "unk_token": None}),
    "added_token_dicts": dict(config={"eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,
                                                    "rstrip": True, "normalized": False, "single_word": False,
                                                    "special": True}}),
    "added_tokens_decoder": dict(config={"added_tokens_decoder": {
        "5": {"content": "<|im_end|>", "lstrip": True, "normalized": False, "rstrip": False, "single_word": False,
              "special": True},
        "4": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
              "single_word": False, "special": False}}}),
    "extra_special_tokens": dict(config={"extra_special_tokens": ["<tool>", "<new_extra>"]}),
    "additional_special_tokens": dict(config={"additional_special_tokens": ["<|im_start|>"]}),
    "split_special_tokens": dict(config={"split_special_tokens": True}),
    "cleanup_on_bpe": dict(config={"clean_up_tokenization_spaces": True}),
    "cleanup_on_wordpiece": dict(kind="wordpiece", config={"clean_up_tokenization_spaces": True}),
    "wordpiece": dict(kind="wordpiece"),
    "chatml_file": dict(template=CHATML, config={"eos_token": "<|im_end|>"}),
    "rich_template_in_config": dict(config={"chat_template": RICH}),
    "template_file_wins": dict(template=CHATML, config={"chat_template": RICH}),
    "named_templates": dict(config={"chat_template": [{"name": "default", "template": RICH},
                                                      {"name": "tool_use", "template": CHATML}]}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_tokenizers_read_directly_match_transformers(tmp_path, variant):
    folder = _tiny(tmp_path / variant, **VARIANTS[variant])
    assert JsonTokenizer.accepts(folder)
    _same(folder)


def test_folders_the_reader_leaves_go_to_transformers_and_still_match(tmp_path):
    cases = {
        "gpt2_class": lambda f: _tiny(f, config={"tokenizer_class": "GPT2Tokenizer"}),
        "model_config_beside": lambda f: (_tiny(f), (f / "config.json").write_text('{"model_type": "llama"}')),
        "unknown_setting": lambda f: _tiny(f, config={"do_lower_case": True}),
        "model_specific_token": lambda f: _tiny(f, config={"image_token": "<tool>"}),
        "legacy_special_tokens_map": lambda f: (_tiny(f), (f / "special_tokens_map.json").write_text('{}')),
    }
    for name, build in cases.items():
        build(tmp_path / name)
        assert not JsonTokenizer.accepts(tmp_path / name), name
        assert type(ZipjaxTokenizer(tmp_path / name)._tok).__name__ == "_Transformers", name
    _same(tmp_path / "unknown_setting")
    for name, config in {"split_as_text": {"split_special_tokens": "false"}, "bad_side": {"padding_side": "up"},
                         "bad_templates": {"chat_template": [{"name": "default"}]}}.items():
        assert not JsonTokenizer.accepts(_tiny(tmp_path / name, config=config)), name
    no_json = tmp_path / "no_json"
    shutil.copytree(tmp_path / "unknown_setting", no_json)
    (no_json / "tokenizer.json").unlink()
    assert not JsonTokenizer.accepts(no_json)


def test_a_broken_tokenizer_json_is_one_error_line(tmp_path):
    from zipjax.errors import ZipjaxError

    folder = _tiny(tmp_path / "broken")
    (folder / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ZipjaxError, match="cannot load the tokenizer in"):
        ZipjaxTokenizer(folder)
    (folder / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ZipjaxError, match="not valid JSON"):
        ZipjaxTokenizer(folder)


def test_the_generate_command_on_the_shipped_checkpoint_imports_no_transformers():
    """The start-up path: `zipjax generate` reads the tokenizer directly and loads no other command's modules."""
    code = ("import sys; from zipjax.cli import main; "
            f"argv = ['generate', '--checkpoint', {str(SHIPPED[0])!r}, '--max-new-tokens', '2', 'def f():']; "
            "assert main(argv) == 0; "
            "print('MODULES', *sorted(m for m in ('transformers', 'torch', 'zipjax.convert', 'zipjax.zipar', "
            "'zipjax.image', 'zipjax.emu3.understand', 'zipjax.emu3.png') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("MODULES")[-1].split() == []
