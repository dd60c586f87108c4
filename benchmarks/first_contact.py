"""How long a newcomer waits: `zipjax generate` on the shipped checkpoint run as a fresh process, first with an empty
compilation cache, then again (the second identical call), wall time and the phases its own status line reports.

    python -m benchmarks.first_contact [--runs 3] [--out DIR]

Each run is `zipjax generate "def fibonacci(n):" --max-new-tokens 8` in a new interpreter with ZIPJAX_COMPILATION_CACHE
pointing at a fresh folder (so the first call compiles and later calls read it). Reported per call: wall seconds
(interpreter start to exit), and compile / prefill / decode seconds parsed from the status line. The second call's
compile phase must stay under `--bound` seconds (default 2: "starts decoding in well under 2 s"); the run fails
(exit 1) otherwise. first_contact.json goes to `--out` (benchmarks/report.py; untracked by default).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import report

COMMAND = ["-m", "zipjax.cli", "generate", "def fibonacci(n):", "--max-new-tokens", "8"]
STATUS = re.compile(r"compile (?P<compile>[\d.]+)s.*prefill (?P<prefill>[\d.]+)s, decode (?P<decode>[\d.]+)s")


def one_call(cache: str) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *COMMAND], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ZIPJAX_COMPILATION_CACHE": cache}, cwd=report.ROOT)
    wall = time.perf_counter() - start
    match = STATUS.search(done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"zipjax generate failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return {"wall_s": wall, **{k: float(v) for k, v in match.groupdict().items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="warm calls after the cold one (default 3)")
    parser.add_argument("--bound", type=float, default=2.0, help="seconds the warm compile phase must stay under")
    report.add_out_argument(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        cold = one_call(cache)
        warm = [one_call(cache) for _ in range(args.runs)]
    median = {key: statistics.median(call[key] for call in warm) for key in cold}
    report.print_table(["call", "wall s", "compile s", "prefill s", "decode s"],
                       [[name, f"{c['wall_s']:.2f}", f"{c['compile']:.2f}", f"{c['prefill']:.2f}", f"{c['decode']:.2f}"]
                        for name, c in (("first (empty cache)", cold), (f"second (median of {args.runs})", median))],
                       title="zipjax generate on checkpoints/stdlib-llama, 8 tokens, a fresh process per call")
    load = os.getloadavg()[0]
    path = report.write_json(args.out / "first_contact.json", {"cold": cold, "warm": warm, "warm_median": median,
                                                                "bound_s": args.bound, "load_average": load})
    print(f"wrote {report.repo_path(path)} (load average {load:.2f})", file=sys.stderr)
    if median["compile"] >= args.bound:
        print(f"the second call's compile phase took {median['compile']:.2f} s, over the {args.bound} s bound",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
