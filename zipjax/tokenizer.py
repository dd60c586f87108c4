"""Text <-> token ids for a checkpoint folder, through transformers' AutoTokenizer (offline, files only).

Using the same tokenizer class as transformers keeps special-token handling (BOS insertion, chat templates)
identical to the reference, which the parity tests rely on.
"""

from __future__ import annotations

from pathlib import Path

from zipjax.errors import ZipjaxError

# Files a Hugging Face tokenizer may consist of; converters copy whichever exist.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class Tokenizer:
    def __init__(self, folder: Path):
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            raise ZipjaxError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ZipjaxError(f"cannot load the tokenizer in {folder}: {e}") from None

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
