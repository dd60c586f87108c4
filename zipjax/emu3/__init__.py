"""Emu3 (BAAI): a LLaMA-shaped language model over text and visual tokens, plus its MoVQ vision tokenizer.

`zipjax.load` returns an `Emu3Model` for a converted Emu3 checkpoint; `generate_image` turns a prompt into an image.
"""

from zipjax.emu3.model import Emu3Model, Emu3Vision
from zipjax.emu3.vocab import Emu3Vocab
from zipjax.emu3.vq_config import VQConfig

__all__ = ["Emu3Model", "Emu3Vision", "Emu3Vocab", "VQConfig"]
