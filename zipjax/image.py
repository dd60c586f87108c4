"""Text-to-image with Emu3: prompt formatting, the decoder's run, VQ decode.

    result = zipjax.generate_image(model, "a cat on a red sofa", size=(720, 720), cfg_scale=3.0, seed=0)
    result.images[0]            # uint8 [720, 720, 3]
    result.num_forward_passes   # 8190 for a 90x90-code image (prefill counted as one)
    zipjax.generate_image(model, "a cat", decoder=zipar.FixedWindow(7))       # ZipAR: 89 * 7 + 90 = 713 passes
    zipjax.generate_image(model, "a cat", decoder=Sequential(kv=zipjax.kv.ZipCache()))
    zipjax.generate_image(model, "a cat", decoder=zipar.FixedWindow(7, kv=zipjax.kv.ZipCache()))  # both
    result.kv_nbytes            # bytes of the KV cache the decode held (from shapes)

The prompt is BOS + text + `<|image start|>` + "h*w" + `<|image token|>` (h, w in codes); the negative prompt is
formatted the same way, and both run as one left-padded batch. `generate_image` validates the arguments, builds the
static setup and traced inputs of zipjax.emu3.decoding, and hands them to the decoder, an object that holds its own
settings (validated when it is made) and knows how to run: `Sequential` (one token per pass, any KV cache;
zipjax.emu3.sequential), ZipAR's `FixedWindow` and `AdaptiveWindow`, and Speculative Jacobi Decoding's `SJD`
(zipjax.zipar; the dense cache, or ZipCache / Uniform through zipjax.zipar.compressed's band cache). After the image
tokens come end-of-frame, end-of-image and EOS; the codes go through the VQ-VAE decoder.

This module sits above both zipjax.emu3 (the model and the decoding contract) and zipjax.zipar (the parallel
decoders); neither imports it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from zipjax.emu3.decoding import Decoder, ImageDecodeSetup, ImageInputs, ImageKnobs, ImageLayout
from zipjax.emu3.model import Emu3Model
from zipjax.emu3.sequential import Sequential
from zipjax.errors import ZipjaxError
from zipjax.kv.methods import attention_nbytes, cache_nbytes, check_cache, check_free_memory
from zipjax.platform import use_kernel
from zipjax.sampling import SamplingMode, check_settings
from zipjax.shapes import cache_length, left_pad, prompt_bucket
from zipjax.sharding import mesh_context, place
from zipjax.validate import integer, number
from zipjax.zipar import SJD, AdaptiveWindow, FixedWindow
from zipjax.zipar.cache import ScatterRecipe, band_recipe

__all__ = ["DEFAULT_NEGATIVE_PROMPT", "SJD", "AdaptiveWindow", "Decoder", "FixedWindow", "ImageResult", "Sequential",
           "format_prompt", "generate_image", "token_grid"]

DEFAULT_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                           "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, "
                           "watermark, username, blurry.")


@dataclasses.dataclass(frozen=True)
class ImageResult:
    images: np.ndarray  # uint8 [batch, H, W, 3]
    tokens: np.ndarray  # int32 [batch, h * (w + 1) + 3]: rows of visual tokens + EOL, then EOF, EOI, EOS
    codes: np.ndarray  # int32 [batch, h, w]
    num_forward_passes: int  # model calls for the whole batch, prefill counted as one
    prompt_ids: list[list[int]]
    kv_nbytes: int = 0  # bytes of the KV cache held while decoding (every sequence, guidance's included; shapes)


DEFAULT_DECODER = Sequential()  # one token per pass, dense KV cache
DEPRECATED = ("zipar_window", "zipar_min_window", "zipar_kernel", "sjd_window", "kv")


def deprecated_decoder(decoder: Decoder, old: dict) -> Decoder:
    """The decoder named by the keyword arguments `generate_image` took before decoder objects (kept for one
    release, with a DeprecationWarning): zipar_window=s -> FixedWindow(s), zipar_window="adaptive" with
    zipar_min_window=m -> AdaptiveWindow(m), sjd_window=w -> SJD(w), kv=method -> Sequential(kv=method),
    zipar_kernel -> their `kernel`."""
    unknown = sorted(set(old) - set(DEPRECATED))
    if unknown:
        raise TypeError(f"generate_image() got an unexpected keyword argument {unknown[0]!r}")
    if not old:
        return decoder
    warnings.warn(f"generate_image's {', '.join(old)} argument(s) are deprecated: pass decoder=zipar.FixedWindow(s), "
                  "zipar.AdaptiveWindow(m), zipar.SJD(w) or Sequential(kv=method)", DeprecationWarning, stacklevel=3)
    if decoder != DEFAULT_DECODER:
        raise ZipjaxError(f"decoder= and the deprecated {', '.join(old)} both choose the decoder; give decoder= only")
    window, sjd, kv = old.get("zipar_window"), old.get("sjd_window"), old.get("kv")
    kernel, min_window = old.get("zipar_kernel"), old.get("zipar_min_window", 4)
    if sjd is not None and window is not None:
        raise ZipjaxError("sjd_window (Speculative Jacobi Decoding) must be an integer >= 2, and excludes ZipAR")
    if kv is not None and (window is not None or sjd is not None):
        raise ZipjaxError("the deprecated kv= argument chooses Sequential, one token per pass; for ZipAR or SJD over a "
                          "compressed cache pass decoder=zipar.FixedWindow(s, kv=...), AdaptiveWindow(m, kv=...) or "
                          "SJD(w, kv=...)")
    adaptive = AdaptiveWindow(integer(min_window, "zipar_min_window", lo=1), kernel)  # validated whatever the order
    if sjd is not None:
        return SJD(sjd, kernel)
    if window is None:
        return Sequential(kv)
    if isinstance(window, str) and window == "adaptive":
        return adaptive
    if isinstance(window, str | bool) or not isinstance(window, int | np.integer) or window < 1:
        raise ZipjaxError(f"zipar_window must be None, a positive integer or 'adaptive', got {window!r}")
    return FixedWindow(window, kernel)


def token_grid(model: Emu3Model, size: tuple[int, int] | None) -> tuple[int, int]:
    """(rows, columns) of codes for an image of `size` = (height, width) pixels; default: the model's square size."""
    f = model.vq_config.spatial_factor
    if size is None:
        side = round(math.sqrt(model.vision.image_area) / f)
        return side, side
    if (not isinstance(size, tuple | list) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s <= 0 for s in size)):
        raise ZipjaxError(f"size must be (height, width) in pixels, got {size!r}")
    height, width = size
    if height % f or width % f:
        raise ZipjaxError(f"image size {height}x{width} is not a multiple of the VQ-VAE's factor {f} (each code "
                          f"covers {f}x{f} pixels); try {max(f, round(height / f) * f)}x{max(f, round(width / f) * f)}")
    return height // f, width // f


def format_prompt(model: Emu3Model, prompt: str | Sequence[int], rows: int, cols: int) -> list[int]:
    """Token ids that end where the first image token is sampled. Text is formatted as Emu3 expects; a list of ids
    is taken as the complete formatted prompt and must end with `<|image token|>`."""
    vocab = model.vocab
    if isinstance(prompt, str):
        tok = model.tokenizer
        return [vocab.bos, *tok.encode(prompt, add_special_tokens=False), vocab.boi,
                *tok.encode(f"{rows}*{cols}", add_special_tokens=False), vocab.image_wrapper]
    ids = [int(t) for t in prompt]
    if not ids or ids[-1] != vocab.image_wrapper:
        raise ZipjaxError(f"a prompt given as token ids must be the whole formatted prompt, ending with the image "
                          f"token <|image token|> (id {vocab.image_wrapper})")
    if min(ids) < 0 or max(ids) >= model.config.vocab_size:
        raise ZipjaxError(f"prompt token ids must lie in [0, {model.config.vocab_size})")
    return ids


def formatted_prompts(model: Emu3Model, prompt, negative_prompt, rows: int, cols: int, *,
                      guided: bool) -> tuple[list[list[int]], list[list[int]]]:
    """The formatted conditional prompts, and as many negative ones when guided (the negative prompt defaults to the
    checkpoint's own, else Emu3's)."""
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int | np.integer)) else prompt
    if not prompts:
        raise ZipjaxError("no prompt given")
    if negative_prompt is None:
        negative_prompt = model.vision.negative_prompt or DEFAULT_NEGATIVE_PROMPT
    cond = [format_prompt(model, p, rows, cols) for p in prompts]
    return cond, [format_prompt(model, negative_prompt, rows, cols)] * len(cond) if guided else []


def decode_nbytes(decoder: Decoder, setup: ImageDecodeSetup) -> int:
    """Bytes a decoder needs at once, from shapes alone (jax.eval_shape: nothing is allocated): the KV cache of every
    sequence (`kv_nbytes`); SJD's distribution of every drafted token; attention's working set (one layer read in
    float32, and without the kernel the weights of a pass's queries: at most one per row for ZipAR, the window for
    SJD). The VQ decode, after the cache is gone, is not counted."""
    layout, batch, config = setup.layout, setup.cache_batch, setup.config
    if isinstance(decoder, Sequential):
        cache_len = cache_length(setup.bucket + layout.num_tokens)
        return kv_nbytes(decoder, setup) + attention_nbytes(config, batch, cache_len)
    window = min(decoder.jacobi_window, layout.num_tokens) if isinstance(decoder, SJD) else 0  # longer: SJD refuses it
    cache_len = cache_length(setup.bucket + layout.num_tokens + window + 1)
    drafts = setup.batch * (layout.num_tokens + window) * layout.codebook_size * 4  # float32
    queries = window or layout.height
    weights = 0 if use_kernel(getattr(decoder, "kernel", None)) else batch * config.num_heads * queries * cache_len * 4
    return (kv_nbytes(decoder, setup) + (drafts if window else 0) + attention_nbytes(config, batch, cache_len)
            + weights)


def kv_nbytes(decoder: Decoder, setup: ImageDecodeSetup) -> int:
    """Bytes of the KV cache a decoder holds, from shapes (every array is allocated when decoding starts): the
    sequential cache of its method, the scatter cache with its written bitmap, or the compressed band cache (stores,
    the full-precision band, bookkeeping). Checks the cache's geometry at the call site."""
    layout, batch, config = setup.layout, setup.cache_batch, setup.config
    if isinstance(decoder, Sequential):
        cache_len = cache_length(setup.bucket + layout.num_tokens)
        check_cache(decoder.kv, config, batch, cache_len, setup.bucket)
        return cache_nbytes(decoder.kv, config, batch, cache_len, setup.bucket)
    window = min(decoder.jacobi_window, layout.num_tokens) if isinstance(decoder, SJD) else 0
    cache_len = cache_length(setup.bucket + layout.num_tokens + window + 1)
    kv = getattr(decoder, "kv", None)
    recipe = ScatterRecipe(config, batch, cache_len) if kv is None else band_recipe(setup, kv, cache_len,
                                                                                     decoder.band(setup))
    cache = jax.eval_shape(recipe, jax.ShapeDtypeStruct((batch,), jnp.int32))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def check_decode_memory(model: Emu3Model, decoder: Decoder, setup: ImageDecodeSetup) -> None:
    """Refuse, before anything is allocated, a decode that cannot fit a device's free memory (`decode_nbytes`, its
    share per device on a mesh): a huge --size on a config that allows that many positions, say."""
    need = decode_nbytes(decoder, setup) / (model.mesh.size if model.mesh is not None else 1)
    layout = setup.layout
    check_free_memory(need, f"decoding {setup.batch} image(s) of {layout.height}x{layout.width} codes with "
                            f"{type(decoder).__name__} ({setup.cache_batch} sequences)",
                      "ask for a smaller size or fewer images" + (", or turn guidance off (cfg_scale 1)"
                                                                   if setup.guided else ""))


def generate_image(model: Emu3Model, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], *,
                   decoder: Decoder = DEFAULT_DECODER, size: tuple[int, int] | None = None, cfg_scale: float = 3.0,
                   negative_prompt: str | Sequence[int] | None = None, temperature: float = 1.0,
                   top_k: int | None = 2048, top_p: float | None = None, seed: int = 0, progress: bool = False,
                   **deprecated) -> ImageResult:
    """Generate one image per prompt.

    Args:
      prompt: text, token ids of a complete formatted prompt, or a list of either (a batch).
      decoder: `Sequential(kv=None)`: one token per pass, h * (w + 1) passes for h x w codes, on the dense cache or
        a compressed one (`kv=zipjax.kv.ZipCache(...)`, ...). `zipar.FixedWindow(s)`: ZipAR, a row starts once the
        row above is s tokens ahead, (h - 1) * s + w passes. `zipar.AdaptiveWindow(m)`: a row starts on a drafted
        first token once the row above has m tokens, verified as that row grows. `zipar.SJD(w)`: Speculative Jacobi
        Decoding over a window of w tokens. The zipar decoders take `kernel` (zipjax.platform.use_kernel).
      size: (height, width) in pixels, multiples of the VQ factor; default the model's `image_area` as a square.
      cfg_scale: classifier-free guidance weight; 1.0 turns guidance (and the unconditional batch) off.
      negative_prompt: what the unconditional branch is conditioned on (text or formatted token ids); None: the
        checkpoint's own (`model.vision.negative_prompt`, set by its training) or else Emu3's DEFAULT_NEGATIVE_PROMPT.
      temperature: 0 picks the most likely visual token; top_k / top_p filter before sampling.
      deprecated: zipar_window, zipar_min_window, zipar_kernel, sjd_window and kv, the arguments that chose the
        decoder before `decoder=`; they still do for one release, with a DeprecationWarning (`deprecated_decoder`).
    """
    if not isinstance(model, Emu3Model):
        raise ZipjaxError(f"generate_image needs an Emu3 checkpoint; this one is {model.config.architecture}")
    temperature, top_k, top_p, seed = check_settings(temperature, top_k, top_p, seed)
    cfg_scale = number(cfg_scale, "cfg_scale", lo=0, lo_open=True, hi=1e4)
    decoder = deprecated_decoder(decoder, deprecated)
    if not isinstance(decoder, Decoder):
        raise ZipjaxError(f"decoder must be a decoder object, such as Sequential() or zipar.FixedWindow(7), got "
                          f"{decoder!r}")
    rows, cols = token_grid(model, size)
    vocab, cfg = model.vocab, model.config
    layout = ImageLayout(rows, cols, vocab.eol, vocab.visual_offset, vocab.codebook_size)
    cond, uncond = formatted_prompts(model, prompt, negative_prompt, rows, cols, guided=cfg_scale != 1.0)
    batch = len(cond)
    longest = max(len(s) for s in cond + uncond)
    if longest + layout.num_tokens > cfg.max_position_embeddings:
        raise ZipjaxError(f"a {rows}x{cols}-code image needs {layout.num_tokens} tokens after a {longest}-token "
                          f"prompt, more than the model's {cfg.max_position_embeddings} positions")
    padded, starts = left_pad(cond + uncond, prompt_bucket(longest), cfg.pad_id)
    mode = SamplingMode(greedy=temperature == 0, top_p=top_p is not None and top_p < 1,
                        static_top_k=None if top_k is None else min(int(top_k), vocab.codebook_size))
    setup = ImageDecodeSetup(cfg, layout, batch, guided=bool(uncond), mode=mode, bucket=padded.shape[1])
    check_decode_memory(model, decoder, setup)
    knobs = ImageKnobs(cfg_scale=jnp.float32(cfg_scale), temperature=jnp.float32(temperature or 1.0),
                       top_k=jnp.int32(top_k or 0), top_p=jnp.float32(top_p or 1.0))
    inputs = ImageInputs(prompt=place(padded, model.mesh, PartitionSpec("data", None)),
                         starts=place(starts, model.mesh, PartitionSpec("data")), key=jax.random.key(seed),
                         knobs=knobs)
    with mesh_context(model.mesh):
        result = decoder.run(model, setup, inputs, progress)
    tail = np.tile(np.array([vocab.eof, vocab.eoi, vocab.eos], np.int32), (batch, 1))
    codes = vocab.tokens_to_codes(result.tokens, rows, cols)
    return ImageResult(images=model.to_uint8(model.decode_codes(codes)),
                       tokens=np.concatenate([result.tokens, tail], axis=1), codes=codes,
                       num_forward_passes=int(result.passes.max()), prompt_ids=cond,
                       kv_nbytes=kv_nbytes(decoder, setup))
