"""Random-weight transformers Emu3 folders of any size, built locally (tests and benchmarks; nothing downloaded).

    folder = save_random_emu3(tmp_path / "emu3", text=dict(hidden_size=64, ...), vq=dict(base_channels=32, ...))

The folder is what `Emu3ForConditionalGeneration.save_pretrained` writes, plus a small byte-level BPE tokenizer
(trained on a few sentences) that holds Emu3's special tokens and one visual token per VQ code, so the whole
text-to-image path (prompt text, special ids, visual ids) runs as it does for the real model. Needs torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIALS = ("<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|extra_200|>", "<|extra_201|>", "<|image token|>",
            "<|image start|>", "<|image end|>", "<image>")
_CORPUS = [
    "a photo of a cat sitting on a red sofa, masterpiece, film grained, best quality.",
    "a watercolor painting of mountains at sunset with a lake in the foreground.",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, cropped, worst quality, low quality, blurry.",
    "Please describe the image. What is in the picture? You are a helpful assistant. USER: ASSISTANT:",
    "0123456789 * 90*90 64*64 8*8 16*16",
]

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
TINY_VQ = dict(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
               num_res_blocks=1, attn_resolutions=[1], temporal_downsample_factor=4, hidden_size=64,
               num_attention_heads=1)


def build_tokenizer(codebook_size: int, text_vocab: int = 300, corpus: list[str] | None = None):
    """A PreTrainedTokenizerFast: byte-level BPE on `corpus` (default: a few sentences), then Emu3's specials, then
    the visual tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=text_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus or _CORPUS, trainer)
    tok.add_special_tokens([*SPECIALS, *(f"<|visual token {k:06d}|>" for k in range(codebook_size))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|extra_203|>", eos_token="<|extra_204|>",
                                   pad_token="<|endoftext|>")


def save_random_emu3(folder: Path, *, text: dict[str, Any] | None = None, vq: dict[str, Any] | None = None,
                     seed: int = 0, dtype=None, max_shard_size: str | None = None) -> Path:
    """Write a random Emu3ForConditionalGeneration (+ tokenizer) to `folder`; returns the folder."""
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3TextConfig, Emu3VQVAEConfig

    vq_cfg = Emu3VQVAEConfig(**{**TINY_VQ, **(vq or {})})
    tokenizer = build_tokenizer(vq_cfg.codebook_size)
    vocab = tokenizer.get_vocab()
    text_cfg = Emu3TextConfig(**{**TINY_TEXT, **(text or {})}, vocab_size=len(vocab),
                              pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|extra_203|>"],
                              eos_token_id=vocab["<|extra_204|>"])
    config = Emu3Config(vq_config=vq_cfg.to_dict(), text_config=text_cfg.to_dict(), vocabulary_map=vocab)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    _randomize_norm_statistics(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    factor = 2 ** (len(vq_cfg.channel_multiplier) - 1)
    preprocessor = {"image_processor_type": "Emu3ImageProcessor", "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "spatial_factor": factor,
                    "min_pixels": (4 * factor) ** 2, "max_pixels": (16 * factor) ** 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return folder


def _randomize_norm_statistics(model, seed: int) -> None:
    """Fresh BatchNorm/GroupNorm layers are identities; give them random statistics and affines so a parity test
    exercises every term."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            if isinstance(module, torch.nn.BatchNorm3d | torch.nn.GroupNorm):
                module.weight.copy_(1 + torch.randn(module.weight.shape, generator=gen) * 0.1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
