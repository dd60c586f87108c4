"""`zipjax bench-serve URL`: vLLM's serving benchmark (`vllm bench serve`'s metrics and random prompts) against any
OpenAI-compatible server, `zipjax serve` or another; the work is zipjax.serve.loadgen's.

    zipjax serve checkpoints/stdlib-llama --port 8000 &
    zipjax bench-serve http://127.0.0.1:8000 --num-prompts 16 --max-concurrency 16 --output-len 64
    zipjax bench-serve http://127.0.0.1:8000 --request-rate 4 --goodput ttft:500 tpot:100 --out run.json

Prompts are random token ids (`--prompt-kind tokens`, sent as token-id lists) drawn from the vocabulary of
`--tokenizer DIR` (a zipjax checkpoint or a Hugging Face folder), or of the server's `GET /tokenizer_info`
(`vocab_size`) without one; `--prompt-kind text` decodes them to text (needs `--tokenizer`) for servers that take
text only. Each request asks for `ignore_eos`, so it generates exactly `--output-len` tokens; `--no-ignore-eos`
leaves it out and `--extra-body JSON` adds what a server needs instead (transformers serve:
`'{"generation_config": "{\\"eos_token_id\\": -1}"}'`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from zipjax.arguments import non_negative_int, positive_int
from zipjax.errors import ZipjaxError


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (or inf), got {text!r}")
    return value


def _positive_number(text: str) -> float:
    value = _rate(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError("must be finite")
    return value


def _slo(text: str) -> tuple[str, float]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected METRIC:MILLISECONDS such as ttft:500, got {text!r}")
    return name, _positive_number(value)


def _extra_body(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_parser(commands) -> None:
    bench = commands.add_parser("bench-serve", help="benchmark an OpenAI-compatible server with vLLM's serving "
                                                    "metrics (TTFT, TPOT, ITL, E2E latency, throughput, goodput)")
    bench.add_argument("url", help="the server's root, e.g. http://127.0.0.1:8000")
    bench.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    bench.add_argument("--num-prompts", type=positive_int, default=16, help="requests to send")
    bench.add_argument("--request-rate", type=_rate, default=math.inf,
                       help="requests per second, arriving as a seeded Poisson process; inf sends all at once")
    bench.add_argument("--burstiness", type=_positive_number, default=1.0,
                       help="gamma shape of the arrival gaps: 1 is Poisson, <1 burstier, >1 more even")
    bench.add_argument("--max-concurrency", type=positive_int, default=None, help="requests in flight at most")
    bench.add_argument("--input-len", type=positive_int, default=32, help="prompt tokens per request")
    bench.add_argument("--output-len", type=positive_int, default=64, help="tokens generated per request")
    bench.add_argument("--seed", type=non_negative_int, default=0, help="seeds the prompts and the arrival times")
    bench.add_argument("--prompt-kind", choices=("tokens", "text"), default="tokens",
                       help="send random token ids, or those ids decoded to text (needs --tokenizer)")
    bench.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                       help="tokenizer folder (a zipjax checkpoint or a Hugging Face model folder) to draw prompts "
                            "from (default: the vocabulary size from the server's /tokenizer_info)")
    bench.add_argument("--goodput", type=_slo, nargs="+", default=None, metavar="METRIC:MS",
                       help="SLOs for goodput, any of ttft, tpot, e2el in milliseconds: --goodput ttft:500 tpot:50")
    bench.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                       help="do not send ignore_eos (outputs may then end early at an end token)")
    bench.add_argument("--extra-body", type=_extra_body, default=None, metavar="JSON",
                       help="fields added to every request's body")
    bench.add_argument("--timeout", type=_positive_number, default=600.0,
                       help="seconds a request may wait for its next chunk before it counts as failed")
    bench.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                       help="write the settings, metrics and per-request records as JSON")


def _server_vocab_size(root: str) -> int:
    import httpx

    try:
        response = httpx.get(f"{root}/tokenizer_info", timeout=10.0, trust_env=False)
    except httpx.TransportError as e:
        raise ZipjaxError(f"cannot reach the server at {root}: {type(e).__name__} {e}".strip()) from None
    try:
        size = response.json().get("vocab_size") if response.status_code == 200 else None
    except (ValueError, AttributeError):
        size = None
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ZipjaxError(f"{root}/tokenizer_info gives no vocab_size to draw prompts from; give --tokenizer DIR "
                          "(the served model's folder)")
    return size


def make_prompts(args: argparse.Namespace, root: str) -> list:
    from zipjax.serve import loadgen

    tokenizer = None
    if args.tokenizer is not None:
        from zipjax.tokenizer import load_tokenizer

        if not args.tokenizer.is_dir():
            raise ZipjaxError(f"--tokenizer {args.tokenizer} is not a folder")
        tokenizer = load_tokenizer(args.tokenizer)
    if args.prompt_kind == "text":
        if tokenizer is None:
            raise ZipjaxError("--prompt-kind text needs --tokenizer DIR to turn the random token ids into text")
        return loadgen.text_prompts(tokenizer, args.num_prompts, args.input_len, args.output_len, args.seed)
    if tokenizer is not None:
        allowed = loadgen.allowed_token_ids(tokenizer.vocab_size, tokenizer.all_special_ids)
    else:
        allowed = loadgen.allowed_token_ids(_server_vocab_size(root))
    return loadgen.token_prompts(args.num_prompts, args.input_len, args.output_len, allowed, args.seed)


def _check_out(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        raise ZipjaxError(f"cannot write {path}: it is a folder")
    if not (path.parent if str(path.parent) else Path(".")).is_dir():
        raise ZipjaxError(f"cannot write {path}: the folder {path.parent} does not exist")


def run(args: argparse.Namespace) -> None:
    from zipjax.serve import loadgen

    _check_out(args.out)  # before the run, not after it
    root = loadgen.base_url(args.url)
    slos = dict(args.goodput) if args.goodput else None
    loadgen.check_slos(slos)
    prompts = make_prompts(args, root)
    print(f"bench-serve: {args.num_prompts} requests of {args.input_len} prompt tokens ({args.prompt_kind}) and "
          f"{args.output_len} output tokens, rate {args.request_rate:g}/s, max concurrency "
          f"{args.max_concurrency or 'unbounded'}, against {root}", file=sys.stderr)
    result = loadgen.benchmark(root, prompts, model=args.model, request_rate=args.request_rate,
                               max_concurrency=args.max_concurrency, seed=args.seed, burstiness=args.burstiness,
                               ignore_eos=args.ignore_eos, extra_body=args.extra_body, slos=slos,
                               timeout=args.timeout)
    print(loadgen.format_report(result["metrics"]))
    if args.out is not None:
        args.out.write_text(json.dumps({**result, "input_len": args.input_len, "output_len": args.output_len,
                                        "prompt_kind": args.prompt_kind}, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
