"""Emu3's special tokens and the map between VQ codes and token ids.

Emu3 writes an image as text: `<|image start|>` "H*W" `<|image token|>`, then H rows of W visual tokens each closed
by an end-of-line token, then end-of-frame and `<|image end|>`. Visual token k is the string
`<|visual token kkkkkk|>`; in every released vocabulary those ids are contiguous, so code k is id
`visual_offset + k` and the map is one addition (anything else is refused at conversion).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from zipjax.errors import ZipjaxError
from zipjax.validate import MAX_VOCAB, integer

# role -> token string, as in BAAI's tokenizer and transformers' Emu3 processor
SPECIAL_TOKENS = {
    "image_wrapper": "<|image token|>",
    "boi": "<|image start|>",
    "eoi": "<|image end|>",
    "eol": "<|extra_200|>",
    "eof": "<|extra_201|>",
}
IMAGE_PLACEHOLDER = "<image>"  # transformers' stand-in for image tokens in understanding prompts
_VISUAL = re.compile(r"<\|visual token ?(\d+)\|>")


@dataclasses.dataclass(frozen=True)
class Emu3Vocab:
    bos: int
    eos: int
    pad: int
    image_wrapper: int
    boi: int
    eoi: int
    eol: int
    eof: int
    visual_offset: int
    codebook_size: int

    @property
    def visual_ids(self) -> range:
        return range(self.visual_offset, self.visual_offset + self.codebook_size)

    def codes_to_tokens(self, codes: np.ndarray) -> np.ndarray:
        """int codes [..., h, w] -> token ids [..., h, w + 1]: each row followed by the end-of-line token."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ZipjaxError(f"VQ codes must lie in [0, {self.codebook_size})")
        eol = np.full((*codes.shape[:-1], 1), self.eol, np.int32)
        return np.concatenate([codes.astype(np.int32) + self.visual_offset, eol], axis=-1)

    def tokens_to_codes(self, tokens: np.ndarray, height: int, width: int) -> np.ndarray:
        """Image token ids [batch, height * (width + 1) (+ trailing)] -> codes [batch, height, width]."""
        tokens = np.asarray(tokens)
        body = tokens[:, : height * (width + 1)].reshape(tokens.shape[0], height, width + 1)
        if np.any(body[..., -1] != self.eol):
            raise ZipjaxError("the image tokens do not end every row with the end-of-line token")
        codes = body[..., :-1] - self.visual_offset
        if np.any((codes < 0) | (codes >= self.codebook_size)):
            raise ZipjaxError("the image tokens hold ids that are not visual tokens")
        return codes.astype(np.int32)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Emu3Vocab:
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) != fields:
            raise ZipjaxError(f"an Emu3 vocabulary record needs exactly the keys {', '.join(sorted(fields))}")
        return cls(**{k: integer(v, f"Emu3 vocabulary {k}", lo=0, hi=MAX_VOCAB) for k, v in d.items()})

    @classmethod
    def from_vocab_map(cls, vocab_map: Mapping[str, int], *, bos: int, eos: int, pad: int, codebook_size: int,
                       where: str) -> Emu3Vocab:
        """Find the special and visual tokens in a token -> id map; a missing one is an error naming it."""
        missing = [token for token in SPECIAL_TOKENS.values() if token not in vocab_map]
        if missing:
            raise ZipjaxError(f"{where}: the vocabulary lacks Emu3's special tokens {', '.join(missing)}")
        visual = {}
        for token, index in vocab_map.items():
            m = _VISUAL.fullmatch(token) if isinstance(token, str) else None
            if m:
                visual[int(m.group(1))] = integer(index, f"{where}: id of {token}", lo=0, hi=MAX_VOCAB)
        if not visual:
            raise ZipjaxError(f"{where}: the vocabulary has no visual tokens (<|visual token 000000|> ...)")
        if sorted(visual) != list(range(codebook_size)):
            raise ZipjaxError(
                f"{where}: the vocabulary has {len(visual)} visual tokens, but the VQ-VAE codebook has "
                f"{codebook_size} codes"
            )
        offset = visual[0]
        if any(visual[k] != offset + k for k in range(codebook_size)):
            raise ZipjaxError(f"{where}: the visual token ids are not contiguous; zipjax needs code k at id "
                              f"{offset} + k")
        return cls(bos=bos, eos=eos, pad=pad, visual_offset=offset, codebook_size=codebook_size,
                   **{role: integer(vocab_map[token], f"{where}: id of {token}", lo=0, hi=MAX_VOCAB)
                      for role, token in SPECIAL_TOKENS.items()})
