"""The `zipjax` command: `generate` streams text from a checkpoint, `convert` imports one, `export` writes one back
out as a Hugging Face folder, `image` draws a PNG with an Emu3 checkpoint, `ask` questions one about an image, and
`verify` checks a checkpoint's files against their checksums, `experts compress` builds an ME-Switch expert bank
(zipjax.experts) that `generate --experts BANK --expert NAME` serves. `--profile DIR` on `generate` and `image`
writes a jax.profiler trace of the run.

    zipjax generate "def fibonacci(n):"                      # the shipped default model
    zipjax generate --checkpoint DIR --chat "What is the capital of France?"
    zipjax convert ~/models/Llama-3.1-8B-Instruct ~/zipjax/llama-3.1-8b
    zipjax export checkpoints/stdlib-llama /tmp/stdlib-llama-hf
    zipjax experts compress BASE EXPERT1 EXPERT2 --names docs c --out BANK --bits 2 --salient 0.02
    zipjax generate --checkpoint BASE --experts BANK --expert docs "def parse(text):"
    zipjax convert ~/models/Emu3-Gen-hf ~/zipjax/emu3-gen && zipjax image --checkpoint ~/zipjax/emu3-gen "a cat"

Bad input of any kind (arguments, paths, checkpoints, sizes, and the operating system's errors about the user's
files: missing, unreadable, read-only, full) prints one `error: ...` line and exits with status 2, without a
traceback. Ctrl-C exits with 130 after cleaning up; a closed output pipe (`| head`) ends quietly. Any other
exception is a bug in zipjax and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax

from zipjax import kv
from zipjax.arguments import integer as _integer
from zipjax.arguments import number as _number
from zipjax.arguments import path as _path
from zipjax.arguments import positive_int as _positive_int
from zipjax.checkpoint import load, verify
from zipjax.errors import ZipjaxError
from zipjax.generate import generate_stream
from zipjax.serve import bench_cli
from zipjax.serve import cli as serve_cli
from zipjax.validate import read_bounded

if TYPE_CHECKING:
    from zipjax.image import Decoder

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "stdlib-llama"
MAX_TEXT_BYTES = 256 << 20  # a prompts file or a calibration text: regular files of at most this, read at once


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False)
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a ZipjaxError), not a usage block, and whose help shows every
    flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ZipjaxError(f"{self.prog}: {message} (see {self.prog} --help)")


def default_checkpoint() -> Path:
    path = Path(os.environ.get("ZIPJAX_DEFAULT_CHECKPOINT") or DEFAULT_CHECKPOINT)  # set but empty: unset
    if not path.exists():
        raise ZipjaxError(
            f"no --checkpoint given and the default checkpoint is not at {path} "
            "(it ships in the repository: install zipjax from a clone with `pip install -e .`)"
        )
    return path


def _zipar_window(text: str) -> int | str:
    return text if text == "adaptive" else _positive_int(text)


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 720x720, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return height, width


def _text(value: str, what: str) -> str:
    """Command-line text as the tokenizer will see it: non-empty and valid UTF-8 (undecodable bytes arrive as lone
    surrogates)."""
    if not value:
        raise ZipjaxError(f"the {what} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ZipjaxError(f"the {what} is not valid UTF-8 text") from None
    return value


def _generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="stream text generated from a prompt, or answer a file of prompts")
    gen.add_argument("prompt", nargs="?", default=None,
                     help="the prompt text ('-': read it from standard input); or give --prompts")
    gen.add_argument("--prompts", type=_path, default=None, metavar="FILE",
                     help="a batch: one prompt per line, or JSON lines ({\"prompt\": ...} or {\"messages\": [...]}, an "
                          "optional \"id\"); '-' reads standard input; one JSON line per prompt is written out")
    gen.add_argument("--batch-size", type=_positive_int, default=8, help="prompts generated together with --prompts")
    gen.add_argument("--checkpoint", type=_path, default=None,
                     help="zipjax checkpoint folder (default: the shipped checkpoints/stdlib-llama)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=100, help="tokens to generate at most")
    gen.add_argument("--temperature", type=_number, default=0.0, help="0 (default) is greedy decoding")
    gen.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=_number, default=None, help="sample within this probability mass (nucleus)")
    gen.add_argument("--seed", type=_integer, default=0, help="the random seed of sampling")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    _kv_argument(gen)
    kernels = ", ".join(name for name, method in kv.METHODS.items() if method.has_kernel)
    gen.add_argument("--kv-kernel", action="store_true",
                     help=f"decode attention over the packed codes with the Pallas kernel, also on CPU ({kernels})")
    _profile_argument(gen)
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="compute dtype (default: as stored)")
    gen.add_argument("--experts", type=_path, default=None, metavar="BANK",
                     help="an expert bank built on this checkpoint (zipjax experts compress)")
    gen.add_argument("--expert", default=None, help="the expert to generate with (a name in the bank, or 'auto')")
    gen.add_argument("--router", type=_path, default=None, metavar="DIR",
                     help="with --expert auto: the router's folder (default: the bank's folder, then beside it)")
    gen.add_argument("--delta-mode", choices=("dense", "grouped", "kernel", "merged"), default=None,
                     help="how expert deltas are applied: 'kernel' (the Pallas kernel), 'dense' or 'grouped' (the "
                     "jax.numpy paths), 'merged' (W_base + delta built per expert; one expert per run); default: "
                     "the kernel on TPU/GPU, dense on CPU")


def _kv_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv", choices=("dense", *kv.METHODS), default="dense",
                        help="KV cache: dense (default), or a zipjax.kv method with its defaults: zipcache (4/2-bit "
                             "mixed precision, 60%% salient), kivi (2-bit), uniform (4-bit token-wise), zipvl (sparse "
                             "prefill, 4/2-bit important tokens), minicache (cross-layer merge)")


def _experts_parser(commands) -> None:
    group = commands.add_parser("experts", help="ME-Switch expert banks: compressed deltas of fine-tuned experts")
    actions = group.add_subparsers(dest="experts_command", required=True)
    comp = actions.add_parser("compress", help="compress experts fine-tuned from BASE into a bank folder")
    comp.add_argument("base", type=_path, help="the base zipjax checkpoint")
    comp.add_argument("experts", type=_path, nargs="+", help="expert zipjax checkpoints (same architecture)")
    comp.add_argument("--names", nargs="+", default=None, help="expert names (default: the folder names)")
    comp.add_argument("--out", type=_path, required=True, help="the bank folder to write")
    comp.add_argument("--bits", type=_positive_int, default=2, help="bits per delta entry: 1, 2, 3 or 4")
    comp.add_argument("--salient", type=_number, default=0.02, help="fraction of input channels kept exact")
    comp.add_argument("--embed-bits", type=_positive_int, default=4, help="bits of the embedding / LM-head deltas")
    comp.add_argument("--calibration", type=_path, default=None, metavar="TEXT",
                      help="a text file whose tokens weigh the salient-channel choice (default: unweighted)")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing bank folder")
    route = actions.add_parser("router", help="train the router that --expert auto asks, from a text per expert")
    route.add_argument("base", type=_path, help="the base zipjax checkpoint the bank was built on")
    route.add_argument("bank", type=_path, help="the expert bank the router routes to")
    route.add_argument("--text", nargs="+", required=True, metavar="NAME=FILE",
                       help="a text of each expert's domain (every expert of the bank needs one)")
    route.add_argument("--out", type=_path, default=None,
                       help="where to write router.json and router.npz (default: the bank's folder)")
    route.add_argument("--overwrite", action="store_true", help="replace a router already there")


def _convert_parsers(commands) -> None:
    conv = commands.add_parser("convert", help="convert a Hugging Face folder or GGUF file into a zipjax checkpoint")
    conv.add_argument("src", type=_path, help="Hugging Face model folder, or a .gguf file")
    conv.add_argument("dst", type=_path, help="destination checkpoint folder")
    conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="cast the weights (default: keep the source dtype; float32 for quantized GGUF)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    conv.add_argument("--vision-tokenizer", type=_path, default=None,
                      help="Emu3 in BAAI's layout: the separate vision tokenizer (Emu3-VisionTokenizer) folder")
    export = commands.add_parser("export", help="write a zipjax checkpoint as a Hugging Face model folder")
    export.add_argument("src", type=_path, help="zipjax checkpoint folder")
    export.add_argument("dst", type=_path, help="destination Hugging Face folder")
    export.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _image_parsers(commands) -> None:
    image = commands.add_parser("image", help="generate an image with an Emu3 checkpoint and write it as PNG")
    image.add_argument("prompt", help="what the image should show")
    image.add_argument("--checkpoint", type=_path, required=True, help="a converted Emu3 checkpoint folder")
    image.add_argument("--out", type=_path, default=Path("image.png"), help="PNG to write (default image.png)")
    image.add_argument("--size", type=_size, default=None,
                       help="HEIGHTxWIDTH in pixels, multiples of the VQ factor (default: the model's native size)")
    image.add_argument("--cfg-scale", type=_number, default=3.0, help="classifier-free guidance (1 turns it off)")
    image.add_argument("--negative-prompt", default=None,
                       help="what to steer away from (default: the checkpoint's own, else Emu3's)")
    image.add_argument("--temperature", type=_number, default=1.0, help="0 picks the most likely visual token")
    image.add_argument("--top-k", type=_positive_int, default=2048, help="sample among the k most likely codes")
    image.add_argument("--top-p", type=_number, default=None, help="sample within this probability mass")
    image.add_argument("--seed", type=_integer, default=0, help="the random seed of sampling")
    image.add_argument("--zipar-window", type=_zipar_window, default=None,
                       help="ZipAR parallel decoding: start a row once the row above is this many tokens ahead, "
                            "or 'adaptive' (draft a row's first token early, verify it as context grows)")
    image.add_argument("--zipar-min-window", type=_positive_int, default=4,
                       help="adaptive ZipAR: tokens the row above needs before a row's first token is drafted")
    image.add_argument("--sjd-window", type=_positive_int, default=None,
                       help="decode with Speculative Jacobi Decoding over this many tokens instead")
    image.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="compute dtype (default: as stored)")
    _profile_argument(image)

    question = commands.add_parser("ask", help="ask an Emu3 checkpoint a question about a PNG image")
    question.add_argument("image", type=_path, help="8-bit RGB(A) PNG file")
    question.add_argument("question", help="what to ask about the image")
    question.add_argument("--checkpoint", type=_path, required=True, help="a converted Emu3 checkpoint folder")
    question.add_argument("--max-new-tokens", type=_positive_int, default=None,
                          help="tokens of the answer at most (default: 256, or what the model's positions leave)")
    _kv_argument(question)
    question.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                          help="compute dtype (default: as stored)")


def _profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", type=_path, default=None, metavar="DIR",
                        help="write a jax.profiler trace of the run to DIR (open it with TensorBoard or Perfetto)")


@contextlib.contextmanager
def profiled(directory: Path | None):
    """A jax.profiler trace of the enclosed work written under `directory` (created); nothing without one."""
    if directory is None:
        yield
        return
    if directory.exists() and not directory.is_dir():
        raise ZipjaxError(f"--profile {directory}: exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(directory)):
        yield
    print(f"[profile written to {directory}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="zipjax", description="Fast LLaMA/Mistral/Emu3 inference in JAX.")
    parser.add_argument("--version", action="version", version=f"zipjax {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    _generate_parser(commands)
    _convert_parsers(commands)
    _image_parsers(commands)
    _experts_parser(commands)
    serve_cli.add_parser(commands)
    bench_cli.add_parser(commands)
    check = commands.add_parser("verify", help="check a zipjax checkpoint's files against their recorded checksums")
    check.add_argument("checkpoint", type=_path, help="zipjax checkpoint folder")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zipjax")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def run_generate(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.prompts is None):
        raise ZipjaxError("give a prompt or --prompts FILE (one of them)")
    if args.system is not None and not args.chat:
        raise ZipjaxError("--system needs --chat")
    if args.kv_kernel and not (args.kv != "dense" and kv.METHODS[args.kv].has_kernel):
        with_kernel = " or ".join(f"--kv {name}" for name, method in kv.METHODS.items() if method.has_kernel)
        raise ZipjaxError(f"--kv-kernel needs {with_kernel} (the {args.kv} cache has no kernel)")
    if (args.expert is not None or args.router is not None) and args.experts is None:
        raise ZipjaxError("--expert and --router need --experts BANK")
    items = read_prompts(args.prompts) if args.prompts is not None else [{"prompt": _prompt_argument(args.prompt)}]
    method = None if args.kv == "dense" else kv.method_from_name(args.kv, kernel=True if args.kv_kernel else None)
    model = load(args.checkpoint or default_checkpoint(), dtype=args.dtype)
    model, router = _with_experts(model, args)
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, kv=method)
    if args.prompts is None:
        _stream_one(model, args, items[0], settings, router)
    else:
        _answer_batch(model, args, items, settings, router)


def _prompt_argument(text: str) -> str:
    return _text(sys.stdin.read() if text == "-" else text, "prompt")


def read_prompts(path: Path) -> list[dict]:
    """--prompts: a file ('-': standard input) of one prompt per line, or of JSON objects with "prompt" or
    "messages" (and an optional "id") per line. Blank lines are skipped."""
    import json

    if str(path) == "-":
        text = sys.stdin.read(MAX_TEXT_BYTES + 1)
        if len(text) > MAX_TEXT_BYTES:
            raise ZipjaxError(f"standard input holds more than the {MAX_TEXT_BYTES:,} characters --prompts reads")
    else:
        text = read_bounded(path, "prompts file", MAX_TEXT_BYTES).decode("utf-8", errors="replace")
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            items.append({"prompt": _text(line, f"prompt on line {number}")})
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            raise ZipjaxError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(item, dict) or len({"prompt", "messages"} & set(item)) != 1:
            raise ZipjaxError(f"{path}: line {number} needs exactly one of \"prompt\" and \"messages\"")
        if "prompt" in item and not isinstance(item["prompt"], str):
            raise ZipjaxError(f"{path}: line {number}: \"prompt\" must be text")
        items.append(item)
    if not items:
        raise ZipjaxError(f"{path} holds no prompts")
    return items


def _prompt_ids(tokenizer, args: argparse.Namespace, item: dict) -> list[int]:
    if "messages" in item:
        if not args.chat:
            raise ZipjaxError("prompts given as chat messages need --chat")
        return tokenizer.chat(item["messages"], system=args.system)
    return tokenizer.chat(item["prompt"], system=args.system) if args.chat else tokenizer.encode(item["prompt"])


def _with_experts(model, args: argparse.Namespace):
    """The model with the bank attached (and the router, for --expert auto), or as it is."""
    if args.experts is None:
        return model, None
    from zipjax import experts
    from zipjax.experts.router import MANIFEST, Router

    router = None
    if args.expert == "auto":  # the router is saved in the bank's folder or beside it (zipjax.experts.router)
        folder = args.router or (args.experts if (args.experts / MANIFEST).is_file() else args.experts.parent)
        router = Router.load(folder, model)
    mode = experts.DELTA_MODES[args.delta_mode] if args.delta_mode else {}  # kernel= / path= / merged=
    return experts.attach(model, experts.load(args.experts, model), **mode, check=False, router=router), router


def _expert_for(model, router, args: argparse.Namespace, prompts: list[list[int]]):
    """The expert of each prompt: --expert as given, with 'auto' resolved here so the status line can name it."""
    if args.experts is None:
        return {}
    if args.expert != "auto":
        return {"expert": args.expert}
    from zipjax.experts.serve import route

    return {"expert": route(model, router, prompts)}


def _stream_one(model, args: argparse.Namespace, item: dict, settings: dict, router) -> None:
    from zipjax.clock import CompileClock
    from zipjax.streamer import TextStreamer

    ids = _prompt_ids(model.tokenizer, args, item)
    expert = _expert_for(model, router, args, [ids])
    stop = set(model.config.eos_token_ids)
    with CompileClock() as clock:
        start = time.perf_counter()
        steps = generate_stream(model, [ids], args.max_new_tokens, **settings, **expert)  # checks every setting
        first = next(steps)
        first_seconds, first_compile = time.perf_counter() - start, clock.seconds
        if not args.chat:
            sys.stdout.write(item["prompt"])
        streamer, count = TextStreamer(model.tokenizer), 0
        for step in itertools.chain([first], steps):
            token = int(step[0])
            if token in stop:
                break
            count += 1
            sys.stdout.write(streamer.push(token))
            sys.stdout.flush()
        sys.stdout.write(streamer.flush() + "\n")
        total = time.perf_counter() - start
    decode = max(total - first_seconds - (clock.seconds - first_compile), 1e-9)
    print(f"[{count} tokens: compile {clock.seconds:.2f}s ({clock.cache_hits} programs from the compilation cache), "
          f"prefill {max(first_seconds - first_compile, 0.0):.2f}s, decode {decode:.2f}s "
          f"({max(count - 1, 0) / decode:.1f} tok/s)]", file=sys.stderr)
    _report_extras(args, steps, expert)


def _report_extras(args: argparse.Namespace, steps, expert: dict) -> None:
    """Status lines for what the accelerations did: the KV cache's bytes against a dense one, the expert used."""
    if args.kv != "dense":
        held, dense = steps.cache_nbytes(), steps.dense_cache_nbytes()
        print(f"[KV cache {args.kv}: {held / 2**20:.2f} MiB held, {dense / held:.2f}x smaller than a dense cache "
              f"of the same slots ({dense / 2**20:.2f} MiB)]", file=sys.stderr)
    if args.expert is not None:
        names = expert["expert"]
        chosen = ", ".join(names) if isinstance(names, list) else names
        how = "chosen by the router" if args.expert == "auto" else "as asked"
        print(f"[expert: {chosen}, {how}]", file=sys.stderr)


def _answer_batch(model, args: argparse.Namespace, items: list[dict], settings: dict, router) -> None:
    """--prompts: one JSON line per prompt on standard output, in the input's order, generated in batches."""
    import json

    import numpy as np

    from zipjax.generate import generate

    stop = set(model.config.eos_token_ids)
    start, produced = time.perf_counter(), 0
    for first in range(0, len(items), args.batch_size):
        chunk = items[first:first + args.batch_size]
        prompts = [_prompt_ids(model.tokenizer, args, item) for item in chunk]
        expert = _expert_for(model, router, args, prompts)
        tokens = generate(model, prompts, args.max_new_tokens, **settings, **expert)
        longest = max(len(p) for p in prompts)
        for i, (item, prompt) in enumerate(zip(chunk, prompts, strict=True)):
            new = np.asarray(tokens[i, longest:]).tolist()
            end = next((j for j, t in enumerate(new) if t in stop), None)
            out = {"id": item["id"]} if "id" in item else {}
            out.update(text=model.tokenizer.decode(new[:end]), prompt_tokens=len(prompt),
                       completion_tokens=len(new) if end is None else end,
                       finish_reason="length" if end is None else "stop")
            if args.expert is not None:
                out["expert"] = expert["expert"][i] if isinstance(expert["expert"], list) else expert["expert"]
            produced += out["completion_tokens"]
            print(json.dumps(out, ensure_ascii=False), flush=True)
    seconds = time.perf_counter() - start
    print(f"[{len(items)} prompts, {produced} tokens in {seconds:.1f}s, compile included]", file=sys.stderr)


def run_convert(args: argparse.Namespace) -> None:
    from zipjax.convert import convert  # the commands' own modules load with them: `generate` starts sooner

    dst = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                  vision_tokenizer=args.vision_tokenizer)
    print(f"converted {args.src} -> {dst}")


def image_decoder(args: argparse.Namespace) -> Decoder:
    """The decoder the image command's --zipar-window / --zipar-min-window / --sjd-window name (as --kv names a
    KV method); one token per pass when none does."""
    from zipjax import zipar
    from zipjax.image import Sequential

    if args.sjd_window is not None and args.zipar_window is not None:
        raise ZipjaxError("--sjd-window (Speculative Jacobi Decoding) and --zipar-window are two decoders; give one")
    if args.sjd_window is not None:
        return zipar.SJD(args.sjd_window)
    if args.zipar_window == "adaptive":
        return zipar.AdaptiveWindow(args.zipar_min_window)
    if args.zipar_window is not None:
        return zipar.FixedWindow(args.zipar_window)
    return Sequential()


def run_image(args: argparse.Namespace) -> None:
    from zipjax.emu3.png import check_writable, write_png
    from zipjax.image import generate_image

    prompt = _text(args.prompt, "prompt")
    negative = _text(args.negative_prompt, "negative prompt") if args.negative_prompt is not None else None
    decoder = image_decoder(args)
    out = check_writable(args.out)  # before minutes of generation, not after
    model = load(args.checkpoint, dtype=args.dtype)
    start = time.perf_counter()
    result = generate_image(model, prompt, decoder=decoder, size=args.size, cfg_scale=args.cfg_scale,
                            negative_prompt=negative, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, progress=True)
    write_png(out, result.images[0])
    seconds = time.perf_counter() - start
    height, width = result.images.shape[1:3]
    print(f"wrote {out} ({height}x{width} pixels, HxW as --size; {result.num_forward_passes} forward passes in "
          f"{seconds:.1f}s, compile included)", file=sys.stderr)


def run_ask(args: argparse.Namespace) -> None:
    from zipjax.emu3.png import read_image
    from zipjax.emu3.understand import ask

    question = _text(args.question, "question")
    image = read_image(args.image)  # a bad image fails before the model loads
    model = load(args.checkpoint, dtype=args.dtype)
    start = time.perf_counter()
    method = None if args.kv == "dense" else kv.method_from_name(args.kv)
    answer = ask(model, image, question, kv=method, max_new_tokens=args.max_new_tokens)
    print(answer)
    print(f"[answered in {time.perf_counter() - start:.1f}s, compile included"
          f"{'; the answer is empty' if not answer.strip() else ''}]", file=sys.stderr)
    if args.kv == "zipvl":
        from zipjax.emu3.understand import format_report, zipvl_report

        print(f"[ZipVL's important tokens per layer, image versus text]\n"
              f"{format_report(zipvl_report(model, image, question, method))}", file=sys.stderr)


def run_export(args: argparse.Namespace) -> None:
    from zipjax.convert.export import export_hf

    dst = export_hf(args.src, args.dst, overwrite=args.overwrite)
    print(f"exported {args.src} -> {dst}")


CALIBRATION_WINDOW = 128  # tokens per calibration sequence
CALIBRATION_WINDOWS = 32


def run_experts(args: argparse.Namespace) -> None:
    if args.experts_command == "router":
        return run_router(args)
    from zipjax import experts

    names = args.names or [p.name for p in args.experts]
    if len(names) != len(args.experts):
        raise ZipjaxError(f"--names gives {len(names)} names for {len(args.experts)} experts")
    if len(set(names)) != len(names):
        raise ZipjaxError(f"expert names must be distinct, got {names}")
    from zipjax.experts.bankfile import check_destination

    check_destination(args.out, overwrite=args.overwrite, sources=[args.base, *args.experts])  # before the work
    base = load(args.base)
    calibration = None
    if args.calibration is not None:
        text = read_bounded(args.calibration, "calibration text", MAX_TEXT_BYTES).decode("utf-8", errors="replace")
        ids = base.tokenizer.encode(text)
        window = min(CALIBRATION_WINDOW, base.config.max_position_embeddings)
        windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:CALIBRATION_WINDOWS]
        if not windows:
            raise ZipjaxError(f"{args.calibration} has fewer than {window} tokens; calibration needs at least one "
                              "window")
        calibration = windows
    models = {name: load(path) for name, path in zip(names, args.experts, strict=True)}
    bank = experts.compress(base, models, bits=args.bits, salient=args.salient, calibration=calibration,
                            embed_bits=args.embed_bits)
    out = bank.save(args.out, overwrite=args.overwrite, sources=[args.base, *args.experts])
    sizes = bank.nbytes()
    print(f"wrote {out}: {len(names)} experts, {sizes['per_expert'] / 2**20:.2f} MiB each "
          f"({sizes['total'] / 2**20:.2f} MiB in all)")


def run_router(args: argparse.Namespace) -> None:
    """`zipjax experts router BASE BANK --text NAME=FILE ...`: a router for the bank, trained on the base's features
    of each expert's text, stored in the bank's folder (where `--expert auto` looks first)."""
    from zipjax import experts
    from zipjax.experts.router import ARRAYS, MANIFEST
    from zipjax.harness.router_training import train_from_texts  # harness code, loaded by this command only

    texts = {}
    for item in args.text:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ZipjaxError(f"--text takes NAME=FILE, got {item!r}")
        texts[name] = read_bounded(_path(file), "text", MAX_TEXT_BYTES).decode("utf-8", errors="replace")
    out = args.out or args.bank
    if ((out / MANIFEST).exists() or (out / ARRAYS).exists()) and not args.overwrite:
        raise ZipjaxError(f"{out} already holds a router; pass --overwrite to replace it")
    base = load(args.base)
    bank = experts.load(args.bank, base)
    if set(texts) != set(bank.names):
        raise ZipjaxError(f"--text must name each expert of the bank once ({', '.join(bank.names)}), got "
                          f"{', '.join(texts)}")
    router = train_from_texts(base, {name: texts[name] for name in bank.names})
    router.save(out)
    print(f"wrote a router for {', '.join(bank.names)} to {out} (training accuracy "
          f"{router.record.get('train_accuracy', float('nan')):.2f})")


def run_verify(args: argparse.Namespace) -> None:
    if not (args.checkpoint / "zipjax.json").is_file():
        raise ZipjaxError(f"{args.checkpoint} is not a zipjax checkpoint (no zipjax.json)")
    problems = verify(args.checkpoint)
    for problem in problems:
        print(problem)
    if problems:
        raise ZipjaxError(f"{args.checkpoint} failed verification: {len(problems)} problem(s)")
    print(f"{args.checkpoint}: every file matches its recorded size and SHA-256")


COMMANDS = {"generate": run_generate, "convert": run_convert, "export": run_export, "image": run_image,
            "ask": run_ask, "verify": run_verify, "experts": run_experts, "serve": serve_cli.run,
            "bench-serve": bench_cli.run}


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with standard output closed (`zipjax ... >&-`): nowhere to write results
        print("error: standard output is closed; zipjax writes its results there", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
        with profiled(getattr(args, "profile", None)):
            COMMANDS[args.command](args)
    except ZipjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`zipjax generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the system refused one of the user's files: missing, unreadable, read-only, full
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
