"""Text <-> token ids for a checkpoint folder, exactly as transformers' AutoTokenizer gives them (offline, files only).

Where transformers would use the folder's tokenizer.json as it is (zipjax.tokenizer_json says so from the files), the
`tokenizers` library reads it directly: milliseconds, where importing transformers costs seconds. Any other folder
(a SentencePiece tokenizer.model, a tokenizer class that rebuilds the vocabulary, a model config beside it) loads
through transformers' AutoTokenizer, so special-token handling (BOS insertion, chat templates) stays identical to the
reference either way, which the parity tests check. Code in a model folder never runs: tokenizers load with
`trust_remote_code=False` (transformers then never prompts), and a tokenizer that only custom code could build is
refused by name. Chat templates come from the checkpoint too: they render in a forked child under time, memory
and output limits (`render_bounded`), and their errors are one line.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from zipjax.errors import ZipjaxError
from zipjax.tokenizer_json import JsonTokenizer, settings_info

# Files a Hugging Face tokenizer may consist of; converters copy whichever exist.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def load_tokenizer(folder: Path, **kwargs):
    """transformers' tokenizer for the files in `folder` (kwargs: e.g. gguf_file), never running the folder's code.
    Any failure to parse those files is a ZipjaxError naming the folder."""
    # transformers advises at import that PyTorch is missing (the user tier has none, and tokenizers need none)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # importing transformers costs seconds; only tokenizer users pay it

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **kwargs)
    except Exception as e:  # the files are the user's input: every parse failure is bad input, not a zipjax bug
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ZipjaxError(f"the tokenizer in {folder} needs custom Python code from the folder, which zipjax "
                              "never runs; give it a tokenizer.json") from None
        raise ZipjaxError(f"cannot load the tokenizer in {folder}: {detail}") from None


class Tokenizer:
    def __init__(self, folder: Path):
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            raise ZipjaxError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
        self._tok = JsonTokenizer(folder) if JsonTokenizer.accepts(folder) else _Transformers(folder)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(self._tok.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens=False` leaves out what the tokenizer adds itself (a BOS, say)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`, special tokens left out unless `skip_special_tokens=False`."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def info(self) -> dict:
        """The tokenizer's settings (special tokens as text, model_max_length, ...), its class and chat template:
        what vLLM's /tokenizer_info reports and lm-eval's remote tokenizer reads."""
        return {**self._tok.info(), "vocab_size": self.vocab_size}

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer knows, added tokens included."""
        return self._tok.vocab_size

    def chat(self, messages: str | Sequence[Mapping[str, str]], *, system: str | None = None) -> list[int]:
        """Token ids of a chat prompt, ready for the assistant's answer: `messages` is the user's one message or a
        conversation as `apply_chat_template` takes it ([{"role": "system" | "user" | "assistant", "content": str},
        ...]); `system` puts a system message first. The template comes from the checkpoint, so it is rendered under
        bounds (`render_bounded`); what it renders is then tokenized as transformers' `apply_chat_template(...,
        tokenize=True)` does (no special tokens added)."""
        if not self.has_chat_template:
            raise ZipjaxError("this checkpoint's tokenizer has no chat template")
        conversation = chat_messages(messages, system)
        text = render_bounded(self._tok.chat_renderer(conversation))
        return self._tok.encode(text, add_special_tokens=False)


class _Transformers:
    """transformers' AutoTokenizer behind the interface JsonTokenizer has, for the folders that reader leaves."""

    def __init__(self, folder: Path):
        self._tok = load_tokenizer(folder)
        self.chat_template = getattr(self._tok, "chat_template", None)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """zipjax checks lengths against the model itself, so transformers' warning about the tokenizer's own maximum
        is silenced."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens, verbose=False))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def info(self) -> dict:
        return settings_info(getattr(self._tok, "init_kwargs", {}), type(self._tok).__name__, self.chat_template)

    def chat_renderer(self, conversation: list[dict[str, str]]) -> Callable[[], str]:
        return lambda: self._tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


CHAT_ROLES = ("system", "user", "assistant")


def chat_messages(messages: str | Sequence[Mapping[str, str]], system: str | None = None) -> list[dict[str, str]]:
    """A conversation checked for what every chat template expects: a non-empty list of {"role", "content"} with
    string values and known roles, ending with the user's turn (the answer comes next)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or isinstance(messages, bytes) or not messages:
        raise ZipjaxError("chat messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    conversation = [] if system is None else [{"role": "system", "content": system}]
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise ZipjaxError(f"chat message {i} must have exactly the keys role and content, got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise ZipjaxError(f"chat message {i}: the role must be one of {', '.join(CHAT_ROLES)} and the content "
                              f"text, got role {role!r:.40} and content of type {type(content).__name__}")
        conversation.append({"role": role, "content": content})
    if conversation[-1]["role"] != "user":
        raise ZipjaxError("a chat prompt ends with the user's message (the assistant's answer comes next)")
    return conversation


def render_bounded(render: Callable[[], str], *, seconds: float | None = None, memory: int | None = None,
                   max_chars: int | None = None) -> str:
    """`render()` (a chat template, which a checkpoint supplies) run in a forked child process with a memory limit
    (`memory` bytes of address space beyond the parent's), a time limit (`seconds`, then the child is killed) and a
    limit on the text it returns (`max_chars`). Jinja's sandbox already keeps the template from running code; these
    bound what no sandbox hook sees: a nested loop, `'x' * 3000000000`. Every failure, the template's own errors
    included, is one ZipjaxError line. Where there is no fork, it renders in this process."""
    seconds = CHAT_SECONDS if seconds is None else seconds
    memory = CHAT_MEMORY if memory is None else memory
    max_chars = CHAT_MAX_CHARS if max_chars is None else max_chars
    if not hasattr(os, "fork"):
        return _checked(_render(render), max_chars)
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax warns that a forked multithreaded process may deadlock: the child
        pid = os.fork()  # only renders (pure Python) and exits; the parent kills it if it hangs
    if pid == 0:
        _child(render, read_fd, write_fd, memory, max_chars)
    os.close(write_fd)
    try:
        data = _read_until(read_fd, time.monotonic() + seconds, 4 * max_chars + 4096)
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if data is None:
        raise ZipjaxError(f"the chat template took more than {seconds:g} s to render; zipjax stopped it")
    status, _, body = data.partition(b"\n")
    if status == b"ok":
        return body.decode("utf-8")
    if status == b"error":
        raise ZipjaxError(body.decode("utf-8", errors="replace"))
    raise ZipjaxError("the chat template could not be rendered: the renderer died (out of memory?)")


CHAT_SECONDS = 10.0  # a real template renders in milliseconds
CHAT_MEMORY = 1 << 30
CHAT_MAX_CHARS = 1 << 22  # four million characters: far beyond any model's context


def _render(render: Callable[[], str]) -> str:
    try:
        text = render()
    except MemoryError:
        raise ZipjaxError("the chat template needs more memory than zipjax allows a template") from None
    except RecursionError:
        raise ZipjaxError("the chat template recurses too deeply") from None
    except Exception as e:  # jinja's TemplateError family, TypeError, ...: all are the template's fault
        lines = str(e).strip().splitlines()
        detail = lines[0][:300] if lines else type(e).__name__
        raise ZipjaxError(f"the chat template failed: {type(e).__name__}: {detail}") from None
    if not isinstance(text, str):
        raise ZipjaxError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def _checked(text: str, max_chars: int) -> str:
    if len(text) > max_chars:
        raise ZipjaxError(f"the chat template renders {len(text):,} characters, more than the {max_chars:,} zipjax "
                          "accepts")
    return text


def _child(render: Callable[[], str], read_fd: int, write_fd: int, memory: int, max_chars: int) -> None:
    """In the forked child: limit the address space, render, send "ok" or "error", a newline, the text, exit."""
    try:
        os.close(read_fd)
        with contextlib.suppress(OSError, ValueError):
            pages = int(Path("/proc/self/statm").read_text().split()[0])
            limit = pages * os.sysconf("SC_PAGE_SIZE") + memory
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard),
                                                    hard))
        try:
            payload = b"ok\n" + _checked(_render(render), max_chars).encode("utf-8", errors="replace")
        except ZipjaxError as e:
            payload = b"error\n" + str(e).encode("utf-8", errors="replace")
        except MemoryError:
            payload = b"error\nthe chat template needs more memory than zipjax allows a template"
        view = memoryview(payload)
        while view:
            view = view[os.write(write_fd, view):]
    finally:
        os._exit(0)


def _read_until(fd: int, deadline: float, limit: int) -> bytes | None:
    """Everything written to `fd` until it closes (at most `limit` bytes); None if `deadline` passes first."""
    chunks, total = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            return b"error\nthe chat template renders more text than zipjax accepts"
        chunks.append(chunk)
