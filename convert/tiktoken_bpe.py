"""BAAI's Emu3 tokenizer (a tiktoken rank file plus special tokens) -> a Hugging Face `tokenizer.json`.

BAAI ships its tokenizer as remote code over `tiktoken`; zipjax never runs remote code, so the converter rebuilds
the same tokenizer in the `tokenizers` format: byte-level BPE whose merges are recovered from the ranks (each
multi-byte token is the merge of the two parts that BPE, restricted to lower ranks, splits it into), Qwen's
pre-tokenisation regex, and the special tokens at their ids.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from zipjax.emu3.vocab import Emu3Vocab
from zipjax.errors import ZipjaxError

# The pre-tokeniser pattern of BAAI's tokenizer (Qwen's): digits one by one, letters in runs.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise ZipjaxError(f"{path}:{number} is not a 'base64-token rank' line") from None
    return ranks


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value, as byte-level BPE vocabularies spell tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-pair merge `token` using only merges ranked below `max_rank` (lowest rank first)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    out = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split(token, ranks, rank)
        if len(parts) != 2:
            raise ZipjaxError(f"the tiktoken rank file is not a BPE vocabulary: token {token!r} (rank {rank}) is not "
                              "the merge of two lower-ranked tokens")
        out.append((parts[0], parts[1]))
    return out


def write_tokenizer_json(ranks_path: Path, specials: dict[str, int], vocab: Emu3Vocab, out_dir: Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`; returns the tokenizer.json path."""
    ranks = read_ranks(ranks_path)
    symbols = _byte_symbols()
    spell = lambda b: "".join(symbols[x] for x in b)
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for t, i in sorted(specials.items(), key=lambda item: item[1])],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {spell(t): r for t, r in ranks.items()},
                  "merges": [[spell(a), spell(b)] for a, b in merges(ranks)]},
    }
    by_id = {i: t for t, i in specials.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": by_id[vocab.bos],
              "eos_token": by_id[vocab.eos], "pad_token": by_id[vocab.pad], "add_bos_token": False,
              "clean_up_tokenization_spaces": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir / "tokenizer.json"
