"""`ling serve`: load a checkpoint, start the scheduler, and run the app under uvicorn.

Shutdown (Ctrl-C / SIGTERM) is graceful: the listening socket closes and new requests are
refused, requests in flight get `--shutdown-timeout` seconds to finish, then whatever is
left is cancelled — streams still end properly (finish_reason "abort", then `[DONE]`).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import tyro

from ling.errors import LingError
from ling.kernels import check_mode


@dataclass
class ServeArgs:
    """Serve a checkpoint with an OpenAI-compatible API and a chat page."""

    ckpt: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT")]
    """checkpoint: a ling or Hugging Face directory, or a GGUF file"""
    host: str = "127.0.0.1"
    """address to bind; 0.0.0.0 exposes the server to the network"""
    port: int = 8000
    api_key: Optional[str] = None
    """require 'Authorization: Bearer KEY' on every /v1 route (default: $LING_API_KEY if set)"""
    max_batch_size: int = 8
    """sequences decoded together (rows of the KV cache)"""
    max_model_len: Optional[int] = None
    """longest prompt + completion in tokens (default: the model's context length)"""
    max_queue: int = 256
    """sequences that may wait for a row; beyond that, requests get 503 + Retry-After"""
    max_body_bytes: int = 1 << 20
    """largest request body accepted (413 beyond)"""
    body_timeout: float = 30.0
    """seconds a client may take to send its request body (408 beyond)"""
    model_name: Optional[str] = None
    """the model id clients send and /v1/models lists (default: the checkpoint directory's name)"""
    device: str = "auto"
    """'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: Optional[str] = None
    """fp32, bf16 or fp16 (default: bf16 where the device does bf16 matmuls natively, else fp32)"""
    compile: bool = False
    """torch.compile the decode step before serving: 20–35% faster bf16 decoding on CPU, after
    15–30 s of compilation at startup"""
    shutdown_timeout: float = 30.0
    """seconds requests in flight may take to finish when the server stops"""
    kernels: str = "auto"
    """fast paths: auto = time the candidates on this machine and keep the fastest (the summary
    says which); reference = the plain model (ling/model.py) as it is"""

    def __post_init__(self):
        check_mode(self.kernels)


def build_state(args: ServeArgs):
    """Everything the app needs, from the command's arguments."""
    from ling.device import pick_device, pick_precision
    from ling.infer import Engine
    from ling.serve.app import ServerState
    from ling.serve.metrics import Metrics
    from ling.serve.scheduler import Scheduler

    for name in ("max_batch_size", "max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise LingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (math.isfinite(args.body_timeout) and args.body_timeout > 0):
        raise LingError(f"--body-timeout must be a positive number of seconds, got {args.body_timeout}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise LingError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    device = pick_device(args.device)
    dtype = args.dtype or pick_precision("auto", device)
    engine = Engine(args.ckpt, device=device, dtype=dtype, max_batch_size=args.max_batch_size,
                    max_len=args.max_model_len, compile=args.compile, kernels=args.kernels)
    if engine.tokenizer is None:
        raise LingError(f"{args.ckpt}: no tokenizer.json — the server needs the checkpoint's tokenizer")
    context = engine.cfg.context_length
    if args.max_model_len is not None and not 1 < args.max_model_len <= context:
        raise LingError(f"--max-model-len must be between 2 and the model's context length {context}, "
                        f"got {args.max_model_len}")
    if args.compile:
        started = time.perf_counter()
        print("compiling the decode step ...", flush=True)
        engine.warm_up()
        print(f"compiled in {time.perf_counter() - started:.0f} s", flush=True)
    metrics = Metrics()
    api_key = args.api_key if args.api_key is not None else os.environ.get("LING_API_KEY") or None
    return ServerState(model_name=args.model_name or Path(args.ckpt).resolve().name, tokenizer=engine.tokenizer,
                       scheduler=Scheduler(engine, args.max_queue, metrics), metrics=metrics,
                       max_model_len=engine.max_len, vocab_size=engine.cfg.vocab_size, api_key=api_key,
                       max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout, created=int(time.time()),
                       kernels=engine.kernels)


def make_server(state, shutdown_timeout: float, log_level: str = "info"):
    """A uvicorn server for the app, with graceful shutdown."""
    import uvicorn

    from ling.serve.app import create_app

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            state.scheduler.close()
            asyncio.get_running_loop().call_later(shutdown_timeout, state.scheduler.abort_all)
            await super().shutdown(sockets)

    config = uvicorn.Config(create_app(state), log_level=log_level, timeout_graceful_shutdown=shutdown_timeout + 10)
    return GracefulServer(config)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 = any free port): clients may connect before the app starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LingError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(2048)
    return sock


def serve(args: ServeArgs) -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LingError(f"'ling serve' needs the serve extra ({e.name} is missing): "
                        f"pip install -e '.[serve]' (from the ling checkout)") from None
    if not 0 <= args.port <= 65535:
        raise LingError(f"--port must be between 0 and 65535 (0 = any free port), got {args.port}")
    sock = listen(args.host, args.port)  # first, so that a port in use fails before the model loads
    try:
        state = build_state(args)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    auth = " (API key required)" if state.api_key else ""
    print(f"serving '{state.model_name}' at http://{where}:{port}/v1{auth} — chat page at http://{where}:{port}/",
          flush=True)
    print(state.kernels.summary(), flush=True)
    server = make_server(state, args.shutdown_timeout)
    server.run(sockets=[sock])
