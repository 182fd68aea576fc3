"""``peftlab serve``: the OpenAI-compatible server on uvicorn.

    peftlab serve --model smollm2 --adapters DIR --port 8000 [--host 127.0.0.1] [--max-batch 32]
                  [--api-key KEY] [--adapter-roots DIR,...] [--max-queue 256] [--device auto]

Every adapter directory inside ``--adapters DIR`` (a folder holding ``adapter_config.json``) is
registered under its folder name at start. ``POST /v1/load_lora_adapter`` loads only from
directories under the allowed roots: ``--adapter-roots`` and the ``--adapters`` directory (none
given: loading at run time is refused). ``--port 0`` takes a free port; the line printed at start
names the address.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

from peftlab.train.cli import CliError, DefaultsHelpFormatter, check_device

SERVE_HELP = "serve the model and its adapters over an OpenAI-compatible HTTP API"
API_KEY_ENV = "PEFTLAB_API_KEY"


def _paths(text: str) -> list[Path]:
    return [Path(p.strip()) for p in text.split(",") if p.strip()]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peftlab serve``."""
    parser.add_argument("--model", default="smollm2",
                        help="a zoo name (smollm2) or the directory of any Hugging Face causal LM")
    parser.add_argument("--adapters", type=Path, help="register every adapter directory inside DIR under its folder name")
    parser.add_argument("--adapter-roots", type=_paths, action="extend", default=[], metavar="DIR[,DIR]",
                        help="directories POST /v1/load_lora_adapter may load from (besides --adapters; default: "
                             "only --adapters)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--max-batch", type=int, default=32, help="most requests decoded together")
    parser.add_argument("--max-queue", type=int, default=256, help="most requests waiting; more get 429")
    parser.add_argument("--max-adapter-mb", type=float, default=1024.0, help="largest adapter file accepted (MiB)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="uvicorn's log level (info shows every request)")


def build_parser() -> argparse.ArgumentParser:
    """The ``peftlab serve`` argument parser."""
    parser = argparse.ArgumentParser(prog="peftlab serve", description=SERVE_HELP, formatter_class=DefaultsHelpFormatter)
    add_serve_arguments(parser)
    return parser


def adapter_dirs(root: Path) -> dict[str, Path]:
    """``{folder name: path}`` of every adapter directory (one holding ``adapter_config.json``)
    directly inside ``root``, sorted by name."""
    if not root.is_dir():
        raise CliError(f"--adapters {root}: not a directory; give the folder that holds one directory per adapter")
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "adapter_config.json").is_file()}


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible values before the model is loaded (one line each)."""
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise CliError(f"{flag} {value}: must be at least 1")
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: must be in 0..65535")
    if args.max_adapter_mb <= 0:
        raise CliError(f"--max-adapter-mb {args.max_adapter_mb}: must be positive")
    for root in args.adapter_roots:
        if not root.is_dir():
            raise CliError(f"--adapter-roots {root}: not a directory")
    from peftlab.zoo import ZOO_NAMES

    if args.model not in ZOO_NAMES and not Path(args.model).is_dir():
        raise CliError(f"--model {args.model}: expected a zoo name ({', '.join(ZOO_NAMES)}) or the directory of a "
                       "Hugging Face causal LM")


def make_engine(args: argparse.Namespace) -> Any:
    """The engine over ``--model`` with the server's limits (not started, no adapter yet)."""
    from peftlab.serve.engine import Engine
    from peftlab.zoo import ZOO_NAMES

    roots = [*args.adapter_roots, *([args.adapters] if args.adapters else [])]
    options = dict(max_batch=args.max_batch, max_queue=args.max_queue, device=check_device(args.device, ("cpu", "cuda")),
                   allowed_roots=[str(r.resolve()) for r in roots], max_adapter_bytes=int(args.max_adapter_mb * 2**20))
    if args.model in ZOO_NAMES:
        return Engine.from_zoo(args.model, **options)
    return Engine.from_pretrained(args.model, **options)


def register_adapters(engine: Any, found: dict[str, Path]) -> None:
    """Load each of ``found`` (``{name: directory}``) into the engine under its name."""
    from peftlab.serve.errors import ServeError

    for name, path in found.items():
        try:
            engine.load_adapter(name, str(path))
        except ServeError as err:
            raise CliError(f"--adapters: cannot load {path}: {err}") from err


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn (``port`` 0 picks a free one, then read from the socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise CliError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn serves them
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftlab serve`` until interrupted (Ctrl-C or SIGTERM); returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    check_arguments(args)
    try:
        import uvicorn

        from peftlab.serve.server import create_app
    except ImportError as err:
        raise CliError(f"peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]' ({err})") from err

    found = adapter_dirs(args.adapters) if args.adapters else {}
    sock = listening_socket(args.host, args.port)
    engine = make_engine(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"peftlab serve: warning: listening on {args.host} without --api-key: anyone who can reach it can "
              "generate and load adapters", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(engine, api_key=args.api_key), log_level=args.log_level, access_log=False)
    with engine:
        register_adapters(engine, found)
        address = f"[{host}]" if ":" in host else host
        print(f"peftlab serve: {engine.base_name} with {len(engine.adapter_names())} adapter(s) on "
              f"http://{address}:{port}/v1 (api key {'on' if args.api_key else 'off'})", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    return 0
