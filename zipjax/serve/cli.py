"""`zipjax serve CHECKPOINT`: the OpenAI-compatible HTTP server over the continuous-batching engine.

    zipjax serve checkpoints/stdlib-llama                          # http://127.0.0.1:8000/v1
    zipjax serve ~/zipjax/llama-3.1-8b --port 9000 --max-num-seqs 32 --kv-memory 4GiB
    zipjax serve BASE --experts BANK                               # each expert is a model id of /v1/models
    zipjax serve ~/zipjax/llama-3-70b --mesh 1x8                   # parameters and KV pool split over 8 chips

The port is bound before the model loads, so a port in use is one error line at once. `/health` answers 503 while
the engine compiles its buckets, then 200. Ctrl-C or SIGTERM stop it cleanly: the engine ends its loop (unfinished
requests end with finish_reason "abort"), uvicorn closes the connections. This module's import is light (no jax, no
web framework): `zipjax --help` stays fast; `run` imports what it needs.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import sys
import threading

from zipjax.arguments import integer, path, positive_int
from zipjax.errors import ZipjaxError

DEFAULT_HOST = "127.0.0.1"  # loopback: serving beyond this machine is the user's explicit choice
DEFAULT_PORT = 8000
SERVED_KV = ("zipcache", "kivi", "uniform")  # methods with a packed page format (zipjax.serve.packed)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def _port(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port lies in [0, 65535] (0: any free port), got {value}")
    return value


def _bytes(text: str) -> int:
    """A size such as 4GiB, 512MiB or 1073741824 (binary units; GB is read as GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GiB or 512MiB, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return value


def _mesh(text: str) -> tuple[int, int]:
    """DATAxMODEL, e.g. 2x4: the ("data", "model") mesh to serve on (zipjax.make_mesh)."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not match or not all(int(n) > 0 for n in match.groups()):
        raise argparse.ArgumentTypeError(f"expected a mesh as DATAxMODEL such as 1x8 or 2x4, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def add_parser(commands) -> None:
    """Registers `serve` on the `zipjax` command's subparsers."""
    serve = commands.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    serve.add_argument("checkpoint", type=path, help="zipjax checkpoint folder")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients ask for (default: the checkpoint's folder name)")
    serve.add_argument("--kv", choices=("dense", *SERVED_KV), default="dense",
                       help="KV cache pages: dense (default), or packed pages of a zipjax.kv method with its defaults: "
                            "zipcache (4/2-bit mixed precision, 60%% salient, ranked per page), kivi (2-bit, "
                            "128-token residual), uniform (4-bit token-wise); zipvl and minicache are not served")
    serve.add_argument("--experts", type=path, default=None, metavar="BANK",
                       help="an ME-Switch expert bank built on this checkpoint: each expert is a model id")
    serve.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="compute dtype (default: as stored)")
    serve.add_argument("--mesh", type=_mesh, default=None, metavar="DATAxMODEL",
                       help="serve on a mesh of the devices, e.g. 1x8: parameters split as `zipjax.load("
                            "mesh=)` splits them, the KV pool by KV head over MODEL and by page over DATA "
                            "(default: one device)")
    serve.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TCP port (0: any free port, shown at start)")
    serve.add_argument("--max-num-seqs", type=positive_int, default=16, help="sequences in one engine step at most")
    serve.add_argument("--max-num-batched-tokens", type=positive_int, default=256,
                       help="tokens in one engine step at most (decodes first, then chunked prefill)")
    serve.add_argument("--page-size", type=positive_int, default=None,
                       help="tokens per KV cache page (default: 16; 64 for packed pages, whose per-page statistics "
                            "cost less on longer pages)")
    pool = serve.add_mutually_exclusive_group()
    pool.add_argument("--kv-memory", type=_bytes, default=None, metavar="SIZE",
                      help="memory for the KV page pool, e.g. 4GiB (default: the engine's choice)")
    pool.add_argument("--kv-pages", type=positive_int, default=None,
                      help="pages in the KV pool (with --kv zipcache / kivi / uniform: packed pages)")
    serve.add_argument("--max-model-len", type=positive_int, default=None,
                       help="prompt plus completion tokens at most (default: the model's positions)")
    serve.add_argument("--max-waiting", type=positive_int, default=256,
                       help="requests that may wait for a slot; beyond them a request gets 503 at once")
    serve.add_argument("--no-prefix-cache", action="store_true", help="do not reuse the KV pages of shared prefixes")
    serve.add_argument("--max-body-bytes", type=_bytes, default=4 << 20, metavar="SIZE",
                       help="largest request body accepted (413 beyond it)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), made before the model loads: a port in use is one line at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ZipjaxError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ZipjaxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> None:
    from zipjax.checkpoint import load

    if not (args.checkpoint / "zipjax.json").is_file():
        raise ZipjaxError(f"{args.checkpoint} is not a zipjax checkpoint (no zipjax.json)")
    sock = bind(args.host, args.port)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # uvicorn takes it over while serving, and calls this after
    engine = None
    try:
        mesh = None
        if args.mesh is not None:
            from zipjax.sharding import make_mesh

            mesh = make_mesh(*args.mesh)
        model = load(args.checkpoint, dtype=args.dtype, mesh=mesh)
        if args.experts is not None:
            from zipjax import experts

            model = experts.attach(model, experts.load(args.experts, model), check=False)
        engine = _engine(model, args)
        engine.start()
        _serve(engine, args, sock)
    finally:
        if engine is not None:
            engine.stop()
        sock.close()


def _terminate(signum, frame):
    """SIGTERM outside uvicorn's watch (loading, compiling, after shutdown): exit through the cleanup."""
    raise SystemExit(128 + signum)


def _engine(model, args: argparse.Namespace):
    from zipjax.serve.engine import Engine, EngineConfig

    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          page_size=args.page_size or (16 if args.kv == "dense" else 64),
                          num_pages=args.kv_pages, kv_memory=args.kv_memory,
                          max_model_len=args.max_model_len, prefix_cache=not args.no_prefix_cache,
                          max_waiting=args.max_waiting)
    from zipjax import kv

    method = None if args.kv == "dense" else kv.method_from_name(args.kv)
    return Engine(model, config, kv=method)


def _serve(engine, args: argparse.Namespace, sock: socket.socket) -> None:
    import uvicorn

    from zipjax.serve.api import Limits, create_app

    name = args.served_model_name or args.checkpoint.resolve().name
    app = create_app(engine, served_name=name, limits=Limits(max_body_bytes=args.max_body_bytes))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    experts = f"; experts: {', '.join(engine.expert_names)}" if engine.expert_names else ""
    print(f"[serving {name} at http://{shown}:{port}/v1 (max model length {engine.max_model_len}{experts}); "
          "GET /health answers 200 once the engine is warm; Ctrl-C stops]", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """Ctrl-C / SIGTERM: end the engine's requests now (their streams finish with "abort") rather than
            wait for them. On a thread: a signal handler may interrupt code holding a lock the engine needs."""
            super().handle_exit(sig, frame)
            threading.Thread(target=engine.stop, name="zipjax-engine-stop", daemon=True).start()

    Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
