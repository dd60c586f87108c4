"""One process of a multi-host run on CPU devices (tests/test_multihost.py starts it): every entry point of zipjax
on a ("data" 2, "model" 4) mesh (or the `--parts` named), its results written as JSON by process 0.

    python tests/multihost_worker.py WORK --processes 2 --process-id 0 --port 12355   # one of two hosts
    python tests/multihost_worker.py WORK --processes 1                                # the same mesh, one host

Each process has 8 / processes CPU devices; collectives between processes go through gloo. Every host runs the
same program, as on a TPU pod.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"

import jax

ROOT = Path(__file__).resolve().parents[1]


CACHES = ("ZipCache", "KIVI", "ZipVL", "MiniCache")
IMAGES = ("sequential", "zipar", "adaptive", "sjd")
IMAGE_PARTS = tuple(f"image_{name}" for name in IMAGES)
PARTS = ("greedy", "sampled", "stream", "logits", *CACHES, "convert", *IMAGE_PARTS)


def run(work: Path, parts: set[str]) -> dict:
    """The chosen PARTS on the mesh; `work` holds hf/ (a Hugging Face export of the shipped model) to convert."""
    import numpy as np
    from zipjax.convert import convert

    import zipjax
    from zipjax import kv, zipar
    from zipjax.errors import ZipjaxError
    from zipjax.image import Sequential

    out = {}
    if jax.process_count() > 1:  # a mesh over this host's devices only is refused by name
        try:
            zipjax.load(ROOT / "checkpoints" / "stdlib-llama", mesh=zipjax.make_mesh(devices=jax.local_devices()))
        except ZipjaxError as e:
            out["mesh_error"] = str(e)
    mesh = zipjax.make_mesh(data=2, model=4)
    model = zipjax.load(ROOT / "checkpoints" / "stdlib-llama", mesh=mesh)
    tok = model.tokenizer
    prompts = [tok.encode("def fibonacci(n):"), tok.encode("import os\nimport sys\n")]
    text = {
        "greedy": lambda: zipjax.generate(model, prompts, 12).tolist(),
        "sampled": lambda: zipjax.generate(model, prompts, 12, temperature=0.8, top_k=20, seed=3).tolist(),
        "stream": lambda: [s.tolist() for s in zipjax.generate_stream(model, prompts, 6)],
        "logits": lambda: np.round(np.asarray(model.logits(np.array([prompts[0][:8]] * 2)))[:, -1, :16], 4).tolist(),
    }
    methods = dict(zip(CACHES, (kv.ZipCache(buffer_len=8), kv.KIVI(group=8, residual=16), kv.ZipVL(buffer_len=8),
                                kv.MiniCache()), strict=True))
    out |= {name: make() for name, make in text.items() if name in parts}
    out |= {name: zipjax.generate(model, prompts, 8, kv=methods[name]).tolist() for name in CACHES if name in parts}
    if "convert" in parts:
        converted = convert(work / "hf", work / f"converted-{jax.process_count()}" / "checkpoint", progress=False)
        out["converted_files"] = sorted(p.name for p in converted.parent.iterdir())
        out["converted_greedy"] = zipjax.generate(zipjax.load(converted, mesh=mesh), prompts, 12).tolist()
    digits = zipjax.load(ROOT / "checkpoints" / "digits-emu3", mesh=mesh) if parts & set(IMAGE_PARTS) else None
    image_prompts = ["a handwritten digit three", "a handwritten digit seven"]
    decoders = dict(zip(IMAGES, (Sequential(), zipar.FixedWindow(4), zipar.AdaptiveWindow(4), zipar.SJD(8)),
                        strict=True))
    for name, decoder in decoders.items():
        if f"image_{name}" in parts:
            result = zipjax.generate_image(digits, image_prompts, size=(16, 16), top_k=None, seed=1, decoder=decoder)
            out[f"image_{name}"] = {"tokens": result.tokens.tolist(), "passes": result.num_forward_passes,
                                    "pixels": int(result.images.sum())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path, help="a folder holding hf/; results go to results-{processes}.json")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=12355)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", 8 // args.processes)
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.processes, process_id=args.process_id)
    result = run(args.work, set(args.parts))
    if jax.process_index() == 0:
        (args.work / f"results-{args.processes}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
