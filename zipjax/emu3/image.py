"""Text-to-image with Emu3: prompt formatting, the choice of decoder, VQ decode.

    result = zipjax.generate_image(model, "a cat on a red sofa", size=(720, 720), cfg_scale=3.0, seed=0)
    result.images[0]            # uint8 [720, 720, 3]
    result.num_forward_passes   # 8190 for a 90x90-code image (prefill counted as one)

The prompt is BOS + text + `<|image start|>` + "h*w" + `<|image token|>` (h, w in codes); the negative prompt is
formatted the same way, and both run as one left-padded batch. `generate_image` validates the arguments, builds the
static setup and traced inputs of zipjax.emu3.decoding, and hands them to one decoder from `DECODERS`: sequential
(any KV cache), ZipAR with a fixed or adaptive window, or Speculative Jacobi Decoding. After the image tokens come
end-of-frame, end-of-image and EOS; the codes go through the VQ-VAE decoder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from zipjax.emu3.decoding import Decoder, ImageDecodeSetup, ImageInputs, ImageKnobs, ImageLayout
from zipjax.emu3.model import Emu3Model
from zipjax.emu3.sequential import Sequential
from zipjax.errors import ZipjaxError
from zipjax.kv.methods import as_method
from zipjax.kv.spec import Method
from zipjax.sampling import SamplingMode, check_settings
from zipjax.shapes import left_pad, prompt_bucket
from zipjax.sharding import mesh_context, place
from zipjax.validate import number
from zipjax.zipar.adaptive import AdaptiveWindow
from zipjax.zipar.fixed import FixedWindow
from zipjax.zipar.sjd import SJD

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


@dataclasses.dataclass(frozen=True)
class DecodeArgs:
    """The decoding-order arguments of `generate_image`, as given."""

    zipar_window: int | str | None
    zipar_min_window: int
    zipar_kernel: bool
    sjd_window: int | None
    kv: Method | None

    @property
    def mode(self) -> str:
        if self.sjd_window is not None:
            return "sjd"
        if self.zipar_window is None:
            return "sequential"
        return "adaptive" if isinstance(self.zipar_window, str) and self.zipar_window == "adaptive" else "zipar"


# decoding order -> its decoder, built from the arguments (each decoder validates its own settings)
DECODERS: dict[str, Callable[[DecodeArgs], Decoder]] = {
    "sequential": lambda a: Sequential(as_method(a.kv)),
    "zipar": lambda a: FixedWindow(a.zipar_window, a.zipar_kernel),
    "adaptive": lambda a: AdaptiveWindow(a.zipar_min_window, a.zipar_kernel),
    "sjd": lambda a: SJD(a.sjd_window),
}


def choose_decoder(args: DecodeArgs) -> Decoder:
    """The decoder for these arguments, or a clear error for combinations that do not exist."""
    if args.sjd_window is not None and args.zipar_window is not None:
        raise ZipjaxError("sjd_window (Speculative Jacobi Decoding) must be an integer >= 2, and excludes ZipAR")
    if args.kv is not None and args.mode != "sequential":
        raise ZipjaxError(
            "a quantized KV cache (kv=...) takes one token per pass; ZipAR and SJD passes write several tokens at "
            "scattered slots, which it does not support yet: use kv=None with them, or zipar_window=None with kv"
        )
    AdaptiveWindow(args.zipar_min_window)  # validated whatever the order, as before
    return DECODERS[args.mode](args)


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


def generate_image(model: Emu3Model, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], *,
                   size: tuple[int, int] | None = None, cfg_scale: float = 3.0,
                   negative_prompt: str | Sequence[int] = DEFAULT_NEGATIVE_PROMPT, temperature: float = 1.0,
                   top_k: int | None = 2048, top_p: float | None = None, seed: int = 0,
                   zipar_window: int | str | None = None, zipar_min_window: int = 4, zipar_kernel: bool = False,
                   sjd_window: int | None = None, kv: Method | None = None, progress: bool = False) -> ImageResult:
    """Generate one image per prompt.

    Args:
      prompt: text, token ids of a complete formatted prompt, or a list of either (a batch).
      size: (height, width) in pixels, multiples of the VQ factor; default the model's `image_area` as a square.
      cfg_scale: classifier-free guidance weight; 1.0 turns guidance (and the unconditional batch) off.
      negative_prompt: what the unconditional branch is conditioned on (text or formatted token ids).
      temperature: 0 picks the most likely visual token; top_k / top_p filter before sampling.
      zipar_window: None decodes one token per pass; an integer s decodes with ZipAR: a row starts once the row
        above is s tokens ahead, so an image of h x w codes takes (h - 1) * s + w passes instead of h * (w + 1).
        "adaptive": each row starts on a drafted first token once the row above has `zipar_min_window` tokens, and
        the draft is verified (kept or resampled) as that row grows; the schedule then differs per image.
      sjd_window: decode with Speculative Jacobi Decoding (ZipAR's peer) over a window of this many tokens.
      zipar_kernel: run ZipAR's attention as the Pallas kernel (compiled on GPU/TPU, interpreted on CPU) instead
        of jax.numpy.
      kv: a compressed KV cache (`zipjax.kv.ZipCache(...)`, `KIVI(...)`, `Uniform(...)`, `ZipVL(...)`,
        `MiniCache(...)`) for one-token-per-pass decoding: the prompt block is compressed after prefill and image
        tokens as each window fills.
    """
    if not isinstance(model, Emu3Model):
        raise ZipjaxError(f"generate_image needs an Emu3 checkpoint; this one is {model.config.architecture}")
    temperature, top_k, top_p, seed = check_settings(temperature, top_k, top_p, seed)
    cfg_scale = number(cfg_scale, "cfg_scale", lo=0, lo_open=True, hi=1e4)
    decoder = choose_decoder(DecodeArgs(zipar_window, zipar_min_window, zipar_kernel, sjd_window, kv))
    rows, cols = token_grid(model, size)
    vocab, cfg = model.vocab, model.config
    layout = ImageLayout(rows, cols, vocab.eol, vocab.visual_offset, vocab.codebook_size)

    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int | np.integer)) else prompt
    if not prompts:
        raise ZipjaxError("no prompt given")
    batch = len(prompts)
    cond = [format_prompt(model, p, rows, cols) for p in prompts]
    uncond = [format_prompt(model, negative_prompt, rows, cols)] * batch if cfg_scale != 1.0 else []
    longest = max(len(s) for s in cond + uncond)
    if longest + layout.num_tokens > cfg.max_position_embeddings:
        raise ZipjaxError(f"a {rows}x{cols}-code image needs {layout.num_tokens} tokens after a {longest}-token "
                          f"prompt, more than the model's {cfg.max_position_embeddings} positions")
    padded, starts = left_pad(cond + uncond, prompt_bucket(longest), cfg.pad_id)
    mode = SamplingMode(greedy=temperature == 0, top_p=top_p is not None and top_p < 1,
                        static_top_k=None if top_k is None else min(int(top_k), vocab.codebook_size))
    setup = ImageDecodeSetup(cfg, layout, batch, guided=bool(uncond), mode=mode, bucket=padded.shape[1])
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
                       num_forward_passes=int(result.passes.max()), prompt_ids=cond)
