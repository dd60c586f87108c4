"""Import Emu3 checkpoints: the language model and the vision tokenizer into one zipjax checkpoint.

Two families exist in the wild:

* transformers-native (`Emu3ForConditionalGeneration`, e.g. Emu3-Gen-hf): one folder, config.json with
  `text_config`, `vq_config` and `vocabulary_map`; tensors `text_model.model.*`, `text_model.lm_head.weight`,
  `vqmodel.*` (the names transformers writes; its in-memory `model.text_model.*` names are accepted too).
* BAAI's original remote-code layout: a language-model folder (`Emu3ForCausalLM`, LLaMA tensor names, a tiktoken
  vocabulary `emu3.tiktoken` plus `emu3_vision_tokens.txt`) and a separate vision-tokenizer folder
  (`Emu3VisionVQModel`, config names `ch`, `ch_mult`, `z_channels`).

Either way the result is a zipjax checkpoint whose manifest records the VQ-VAE config and Emu3's special token ids.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from tqdm import tqdm
from zipjax.convert.emu3_vq import BAAI, HF, IGNORED_SUFFIX, source_shape, to_target, vq_tensor_plan
from zipjax.convert.files import TOKENIZER_FILES, existing_files
from zipjax.convert.hf_config import architectures_of, generation_config, read_json, text_config_from_dict
from zipjax.convert.hf_weights import SourceTensor, source_tensors, stored_dtype
from zipjax.convert.mapping import flatten_params, tensors_to_params, unflatten_params
from zipjax.convert.tiktoken_bpe import write_tokenizer_json

from zipjax import checkpoint
from zipjax.config import DTYPES, ModelConfig
from zipjax.emu3.model import DEFAULT_IMAGE_AREA, Emu3Vision
from zipjax.emu3.vocab import Emu3Vocab
from zipjax.emu3.vq_config import CLIP_MEAN, CLIP_STD, VQConfig
from zipjax.emu3.vqvae import abstract_vq_params
from zipjax.errors import ZipjaxError
from zipjax.validate import mapping

# BAAI's tokenizer: regular BPE ranks first, then these specials, then the lines of emu3_vision_tokens.txt
BAAI_TIKTOKEN = "emu3.tiktoken"
BAAI_VISION_TOKENS = "emu3_vision_tokens.txt"
_BAAI_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
_PREPROCESSOR = "preprocessor_config.json"


def emu3_layout(hf: dict[str, Any]) -> str | None:
    """HF or BAAI when config.json describes an Emu3 model, else None."""
    architectures = architectures_of(hf, Path("config.json"))
    if hf.get("model_type") == "emu3" or "Emu3ForConditionalGeneration" in architectures:
        return HF
    if str(hf.get("model_type", "")).lower() == "emu3" or "Emu3ForCausalLM" in architectures:
        return BAAI if hf.get("model_type") == "Emu3" or "auto_map" in hf else HF
    return None


def convert_emu3(src: Path, hf: dict[str, Any], *, dst: Path, vision_tokenizer: Path | None = None,
                 dtype: str | None = None, overwrite: bool = False, progress: bool = True,
                 sources: list[Path] | None = None) -> Path:
    layout = emu3_layout(hf)
    where = src / "config.json"
    text_hf, vq_src, vq = _sources(src, hf, layout, vision_tokenizer)
    config = text_config_from_dict(text_hf, where, architecture="emu3", generation=generation_config(src),
                                   dtype=dtype)
    vocab = _vocab(src, hf, layout, config, vq.codebook_size)

    lm_tensors, vq_tensors = _split_tensors(src, vq_src, layout)
    if dtype is None:
        stored = stored_dtype(lm_tensors) or config.dtype
        if stored not in DTYPES:
            raise ZipjaxError(f"the weights are stored as {stored}; zipjax supports {', '.join(DTYPES)} (pass --dtype)")
        config = config.replace(dtype=stored)
    vq = vq.replace(dtype=dtype or stored_dtype(vq_tensors) or "float32")
    if vq.dtype not in DTYPES:
        raise ZipjaxError(f"the VQ-VAE weights are stored as {vq.dtype}; zipjax supports {', '.join(DTYPES)}")

    arch = "Emu3ForConditionalGeneration" if layout == HF else "Emu3ForCausalLM"
    params = tensors_to_params(config, lm_tensors, architecture_name=arch, progress=progress)
    vq_params = vq_tensors_to_params(vq, vq_tensors, layout, progress=progress)
    vision = Emu3Vision(vq, vocab, image_area=DEFAULT_IMAGE_AREA)
    vision.check(config.vocab_size)

    files = existing_files(src, (*TOKENIZER_FILES, "generation_config.json"))
    files += [f for p in dict.fromkeys((src, vq_src)) for f in existing_files(p, (_PREPROCESSOR,))][:1]
    with tempfile.TemporaryDirectory() as scratch:
        if layout == BAAI and not (src / "tokenizer.json").is_file():
            if progress:
                print("rebuilding BAAI's tiktoken tokenizer as tokenizer.json", flush=True)
            made = write_tokenizer_json(src / BAAI_TIKTOKEN, _baai_vocab_map(src), vocab, Path(scratch))
            files = [f for f in files if f.name not in ("tokenizer_config.json", "special_tokens_map.json")]
            files += [made, made.parent / "tokenizer_config.json"]
        if progress:
            print(f"writing {dst}", flush=True)
        return checkpoint.save(dst, config, params, files=files, overwrite=overwrite, vision=(vision, vq_params),
                               sources=sources or [src, vq_src],
                               metadata={"source": {"kind": f"emu3-{layout}", "path": str(src),
                                                    **({"vision_tokenizer": str(vq_src)} if layout == BAAI else {})}})


def _sources(src: Path, hf: dict[str, Any], layout: str, vision_tokenizer: Path | None
             ) -> tuple[dict[str, Any], Path, VQConfig]:
    """(the language model's config dict, the folder holding the VQ-VAE, the VQ-VAE config) of either layout."""
    where = src / "config.json"
    if layout == HF:
        if "text_config" not in hf or "vq_config" not in hf:
            raise ZipjaxError(
                f"{where}: a transformers Emu3 text-only model (no vq_config) cannot make images; convert the "
                "Emu3ForConditionalGeneration folder, or BAAI's language model with --vision-tokenizer"
            )
        if vision_tokenizer is not None:
            raise ZipjaxError(f"{src} already holds the vision tokenizer; --vision-tokenizer is for BAAI's layout")
        return hf["text_config"], src, _vq_config_hf(hf["vq_config"], where, src / _PREPROCESSOR)
    if vision_tokenizer is None:
        raise ZipjaxError(
            f"{src} is BAAI's Emu3 language model; its images need the vision tokenizer folder "
            "(Emu3-VisionTokenizer): pass --vision-tokenizer DIR"
        )
    vq_src = Path(vision_tokenizer).absolute()
    vq_where = vq_src / "config.json"
    if not vq_where.is_file():
        raise ZipjaxError(f"vision tokenizer folder {vq_src} has no config.json")
    vq_hf = read_json(vq_where, "vision tokenizer config")
    if "Emu3VisionVQModel" not in architectures_of(vq_hf, vq_where) and vq_hf.get("model_type") != "Emu3VisionVQ":
        raise ZipjaxError(f"{vq_where} does not describe an Emu3 vision tokenizer (Emu3VisionVQModel)")
    return hf, vq_src, _vq_config_baai(vq_hf, vq_where, vq_src / _PREPROCESSOR)


def _vq_config_hf(d: dict[str, Any], where: Path, preprocessor: Path) -> VQConfig:
    hidden = d.get("hidden_size")
    cfg = _vq_config(where, preprocessor, dict(
        codebook_size=d.get("codebook_size", 32768), embed_dim=d.get("embed_dim", 4),
        latent_channels=d.get("latent_channels", 4), double_latent=d.get("double_latent", False),
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        temporal_downsample_factor=d.get("temporal_downsample_factor", 4), base_channels=d.get("base_channels", 256),
        channel_multiplier=tuple(d.get("channel_multiplier", (1, 2, 2, 4))),
        num_res_blocks=d.get("num_res_blocks", 2), attn_resolutions=tuple(d.get("attn_resolutions", (3,))),
        attn_heads=d.get("num_attention_heads", 1)))
    if hidden is not None and hidden != cfg.top_channels:
        raise ZipjaxError(f"{where}: vq_config hidden_size {hidden} must equal base_channels * channel_multiplier[-1]"
                          f" = {cfg.top_channels} (the attention blocks run at that width)")
    return cfg


def _vq_config_baai(d: dict[str, Any], where: Path, preprocessor: Path) -> VQConfig:
    return _vq_config(where, preprocessor, dict(
        codebook_size=d.get("codebook_size", 32768), embed_dim=d.get("embed_dim", 4),
        latent_channels=d.get("z_channels", 4), double_latent=d.get("double_z", False),
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        temporal_downsample_factor=d.get("temporal_downsample_factor", 4), base_channels=d.get("ch", 256),
        channel_multiplier=tuple(d.get("ch_mult", (1, 2, 2, 4))), num_res_blocks=d.get("num_res_blocks", 2),
        attn_resolutions=tuple(d.get("attn_resolutions", (3,))), attn_heads=1))


def _vq_config(where: Path, preprocessor: Path, fields: dict[str, Any]) -> VQConfig:
    pre = read_json(preprocessor, "preprocessor config") if preprocessor.is_file() else {}
    try:
        return VQConfig(
            **fields,
            image_mean=tuple(float(x) for x in _three(pre.get("image_mean", CLIP_MEAN))),
            image_std=tuple(float(x) for x in _three(pre.get("image_std", CLIP_STD))),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
            min_pixels=int(pre.get("min_pixels", 512 * 512)), max_pixels=int(pre.get("max_pixels", 1024 * 1024)),
        )
    except (TypeError, ValueError) as e:
        raise ZipjaxError(f"{where}: malformed vision tokenizer config: {e}") from None


def _three(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value] * 3


def _vocab(src: Path, hf: dict[str, Any], layout: str, config: ModelConfig, codebook_size: int) -> Emu3Vocab:
    vocab_map = hf.get("vocabulary_map") or _tokenizer_json_vocab(src) if layout == HF else _baai_vocab_map(src)
    vocab_map = mapping(vocab_map, f"{src}: the vocabulary map")
    missing = [name for name, value in (("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_ids),
                                        ("pad_token_id", config.pad_token_id)) if value is None or value == ()]
    if missing:
        raise ZipjaxError(f"{src}: the config does not name Emu3's {', '.join(missing)}")
    return Emu3Vocab.from_vocab_map(vocab_map, bos=config.bos_token_id, eos=config.eos_token_ids[0],
                                    pad=config.pad_token_id, codebook_size=codebook_size, where=str(src))


def _tokenizer_json_vocab(src: Path) -> dict[str, int]:
    path = src / "tokenizer.json"
    if not path.is_file():
        raise ZipjaxError(f"{src}: config.json has no vocabulary_map and there is no tokenizer.json to read Emu3's "
                          "special tokens from")
    tok = read_json(path, "tokenizer", max_bytes=1 << 30)
    vocab = dict(mapping(mapping(tok.get("model", {}), f"{path}: model").get("vocab", {}), f"{path}: model.vocab"))
    added = tok.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, dict) and "content" in t and "id" in t for t in added):
        raise ZipjaxError(f"{path}: 'added_tokens' must be a list of {{content, id}} objects")
    vocab.update({t["content"]: t["id"] for t in added})
    return vocab


def _baai_vocab_map(src: Path) -> dict[str, int]:
    """Special and vision token ids of BAAI's tokenizer: numbered after the last regular BPE rank."""
    ranks, vision = src / BAAI_TIKTOKEN, src / BAAI_VISION_TOKENS
    for path in (ranks, vision):
        if not path.is_file():
            raise ZipjaxError(f"{src} lacks {path.name}, part of BAAI's Emu3 tokenizer")
    try:
        with ranks.open("rb") as f:
            first_special = 1 + max(int(line.split()[1]) for line in f if line.strip())
        names = [*_BAAI_SPECIALS, *(t.strip() for t in vision.read_text().splitlines() if t.strip())]
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise ZipjaxError(f"{src}: BAAI's tokenizer files {ranks.name} / {vision.name} are malformed: {e}") from None
    return {name: first_special + i for i, name in enumerate(names)}


def _split_tensors(src: Path, vq_src: Path, layout: str) -> tuple[list[SourceTensor], list[SourceTensor]]:
    """(language model tensors in LLaMA naming, VQ-VAE tensors named relative to the VQ-VAE)."""
    if layout == BAAI:
        return source_tensors(src), [t for t in source_tensors(vq_src) if not t.name.endswith(IGNORED_SUFFIX)]
    lm, vq, other = [], [], []
    for t in source_tensors(src):
        name = t.name
        for prefix, target, repl in (("text_model.model.", lm, "model."), ("model.text_model.", lm, "model."),
                                     ("text_model.lm_head.", lm, "lm_head."), ("lm_head.", lm, "lm_head."),
                                     ("vqmodel.", vq, ""), ("model.vqmodel.", vq, "")):
            if name.startswith(prefix):
                if not name.endswith(IGNORED_SUFFIX):
                    target.append(dataclasses.replace(t, name=repl + name[len(prefix):]))
                break
        else:
            other.append(name)
    if other:
        raise ZipjaxError(f"{len(other)} tensors do not belong to an Emu3ForConditionalGeneration model: "
                          f"{', '.join(sorted(other)[:5])}")
    return lm, vq


def vq_tensors_to_params(cfg: VQConfig, tensors: list[SourceTensor], layout: str, *, progress: bool = True) -> dict:
    """Check names and shapes of every VQ-VAE tensor against the config, then load and re-lay them out."""
    targets = flatten_params(abstract_vq_params(cfg))
    plan = {name: (path, kind) for name, path, kind in vq_tensor_plan(cfg, layout)}
    assert set(path for path, _ in plan.values()) == set(targets), "vq_tensor_plan out of step with the module"
    by_name = {t.name: t for t in tensors}
    unexpected = sorted(set(by_name) - set(plan))
    if unexpected:
        raise ZipjaxError(f"{len(unexpected)} vision tokenizer tensors do not fit this VQ-VAE config: "
                          f"{', '.join(unexpected[:5])}")
    missing = sorted(set(plan) - set(by_name))
    if missing:
        raise ZipjaxError(f"{len(missing)} vision tokenizer tensors are missing: {', '.join(missing[:5])}")
    for name, (path, kind) in plan.items():
        expected = source_shape(targets[path].shape, kind)
        if tuple(by_name[name].shape) != expected:
            raise ZipjaxError(f"vision tokenizer tensor {name} has shape {tuple(by_name[name].shape)} but the config "
                              f"implies {expected}")
    flat = {}
    for name, (path, kind) in tqdm(plan.items(), desc="converting vision tokenizer", unit="tensor",
                                   disable=not progress):
        array = to_target(by_name[name].load(), kind)
        flat[path] = array.astype(jnp.dtype(cfg.dtype)) if array.dtype != jnp.dtype(cfg.dtype) else array
    return unflatten_params(flat)

