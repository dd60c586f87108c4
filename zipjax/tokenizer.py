"""Text <-> token ids for a checkpoint folder, through transformers' AutoTokenizer (offline, files only).

Using the same tokenizer class as transformers keeps special-token handling (BOS insertion, chat templates)
identical to the reference, which the parity tests rely on. Code in a model folder never runs: tokenizers load with
`trust_remote_code=False` (transformers then never prompts), and a tokenizer that only custom code could build is
refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from zipjax.errors import ZipjaxError

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
        self._tok = load_tokenizer(folder)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens=False` leaves out what the tokenizer adds itself (a BOS, say)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def chat(self, user_message: str) -> list[int]:
        """Token ids of a one-turn chat prompt, ready for the assistant's answer."""
        if not self.has_chat_template:
            raise ZipjaxError("this checkpoint's tokenizer has no chat template")
        ids = self._tok.apply_chat_template([{"role": "user", "content": user_message}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
