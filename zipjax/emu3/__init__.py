"""Emu3 (BAAI): a LLaMA-shaped language model over text and visual tokens, plus its MoVQ vision tokenizer.

`zipjax.load` returns an `Emu3Model` for a converted Emu3 checkpoint; `zipjax.generate_image` (zipjax.image, above
this package and zipjax.zipar) turns a prompt into an image. Here: the model, the decoding contract every image
decoder shares (decoding), and the sequential decoder (sequential).
"""

from zipjax.emu3.model import Emu3Model, Emu3Vision
from zipjax.emu3.vocab import Emu3Vocab
from zipjax.emu3.vq_config import VQConfig

__all__ = ["Emu3Model", "Emu3Vision", "Emu3Vocab", "VQConfig"]
