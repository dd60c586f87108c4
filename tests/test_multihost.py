"""Multi-host runs: two processes with four CPU devices each (collectives through gloo) give the same tokens as one
process with eight, on the same ("data" 2, "model" 4) mesh, for every entry point (tests/multihost_worker.py).

This is how a TPU pod runs zipjax: every host starts the same program after `jax.distributed.initialize`, inputs
are global arrays each host fills for its own devices, results are gathered explicitly, one process writes files.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from zipjax.convert.export import export_hf

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parents[1]
# In CI, one of each kind: text (greedy, streamed), logits, a quantized cache, conversion, ZipAR image tokens. The
# worker's default is every part (also the other caches, sampling, and the sequential, adaptive and SJD image
# decoders): `python tests/multihost_worker.py` as in its docstring, then compare the two JSON files.
PARTS = ["greedy", "stream", "logits", "KIVI", "convert", "image_zipar"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(work: Path, processes: int, process_id: int = 0, port: int = 0) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": ""}  # the worker sets its own device count
    command = [sys.executable, str(WORKER), str(work), "--processes", str(processes), "--process-id",
               str(process_id), "--port", str(port), "--parts", *PARTS]
    log = work / f"log-{processes}-{process_id}.txt"
    with open(log, "w") as f:
        process = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    process.log = log
    return process


def finish(processes: list[subprocess.Popen]) -> None:
    try:
        for p in processes:
            p.wait(timeout=1200)
    finally:
        for p in processes:
            p.kill()
    for p in processes:
        assert p.returncode == 0, p.log.read_text()[-4000:]


def test_two_hosts_give_the_tokens_of_one(tmp_path):
    export_hf(ROOT / "checkpoints" / "stdlib-llama", tmp_path / "hf", progress=False)
    port = free_port()
    workers = [start(tmp_path, 2, i, port) for i in range(2)] + [start(tmp_path, 1)]
    finish(workers)
    multi = json.loads((tmp_path / "results-2.json").read_text())
    single = json.loads((tmp_path / "results-1.json").read_text())

    assert "mesh_error" not in single
    error = multi.pop("mesh_error")
    assert "mesh holds 4 devices" in error and "2 processes have 8" in error
    assert set(multi) == set(single) == {*PARTS, "converted_files", "converted_greedy"} - {"convert"}
    for key in single:
        assert multi[key] == single[key], key
    # process 0 alone converted and wrote: the folder holds the checkpoint and nothing a second writer left
    assert multi["converted_files"] == ["checkpoint"]
    assert multi["converted_greedy"] == multi["greedy"]
