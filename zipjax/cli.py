"""The `zipjax` command: `generate` streams text from a checkpoint, `convert` imports one, `export` writes one back
out as a Hugging Face folder.

    zipjax generate "def fibonacci(n):"                      # the shipped default model
    zipjax generate --checkpoint DIR --chat "What is the capital of France?"
    zipjax convert ~/models/Llama-3.1-8B-Instruct ~/zipjax/llama-3.1-8b
    zipjax export checkpoints/stdlib-llama /tmp/stdlib-llama-hf

Bad input (paths, checkpoints, sizes) prints `error: ...` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from zipjax.errors import ZipjaxError

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "stdlib-llama"


def default_checkpoint() -> Path:
    path = Path(os.environ.get("ZIPJAX_DEFAULT_CHECKPOINT", DEFAULT_CHECKPOINT))
    if not path.exists():
        raise ZipjaxError(
            f"no --checkpoint given and the default checkpoint is not at {path} "
            "(it ships in the repository: install zipjax from a clone with `pip install -e .`)"
        )
    return path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipjax", description="Fast LLaMA/Mistral inference in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="stream text generated from a prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--checkpoint", type=Path, default=None,
                     help="zipjax checkpoint folder (default: the shipped checkpoints/stdlib-llama)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=100)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    gen.add_argument("--top-k", type=_positive_int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="compute dtype (default: as stored)")

    conv = commands.add_parser("convert", help="convert a Hugging Face folder or GGUF file into a zipjax checkpoint")
    conv.add_argument("src", type=Path, help="Hugging Face model folder, or a .gguf file")
    conv.add_argument("dst", type=Path, help="destination checkpoint folder")
    conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="cast the weights (default: keep the source dtype; float32 for quantized GGUF)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    export = commands.add_parser("export", help="write a zipjax checkpoint as a Hugging Face model folder")
    export.add_argument("src", type=Path, help="zipjax checkpoint folder")
    export.add_argument("dst", type=Path, help="destination Hugging Face folder")
    export.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def run_generate(args: argparse.Namespace) -> None:
    import zipjax

    if not args.prompt:
        raise ZipjaxError("the prompt is empty")
    model = zipjax.load(args.checkpoint or default_checkpoint(), dtype=args.dtype)
    tokenizer = model.tokenizer
    ids = tokenizer.chat(args.prompt) if args.chat else tokenizer.encode(args.prompt)
    stop = set(model.config.eos_token_ids)
    if not args.chat:
        sys.stdout.write(args.prompt)
    generated: list[int] = []
    printed = ""
    start = time.perf_counter()
    for step in zipjax.generate_stream(model, [ids], args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        token = int(step[0])
        if token in stop:
            break
        generated.append(token)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            continue
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{len(generated)} tokens in {seconds:.1f}s, compile included]", file=sys.stderr)


def run_convert(args: argparse.Namespace) -> None:
    from convert import convert

    dst = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted {args.src} -> {dst}")


def run_export(args: argparse.Namespace) -> None:
    from convert.export import export_hf

    dst = export_hf(args.src, args.dst, overwrite=args.overwrite)
    print(f"exported {args.src} -> {dst}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"generate": run_generate, "convert": run_convert, "export": run_export}[args.command](args)
    except ZipjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
