"""``peftlab split serve``: the frozen model behind HTTP, for one split-training client at a time.

Routes (POST bodies and replies are :mod:`wire` messages; an error is a reply with header
``{"kind": "error", "message": ...}`` and HTTP status 400):

    POST /open      {"task", "num_labels", "modules": {name: {"input", "output", "needs_y", "shape"}}}
                    load the model for the task (cached), check the modules, start a session
    POST /forward   {"train", "grad"} + input tensors        -> call ... | done + {"logits"}
    POST /backward  {} + {"grad": dL/dlogits}                -> call ... | done
    POST /answer    {"call"} + {"out"} or {"x", "y"}          -> the next call | done
    POST /close     end the session
    GET  /health    {"model", "sessions", "requests", "bytes_in", "bytes_out"} (POST bodies only)

A new ``/open`` closes the previous session (its client is taken to be gone).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch import nn

import peftlab
from peftlab.train.split.backbone import BackboneSession, Message, SplitError
from peftlab.train.split.wire import WireError, decode, encode


class SplitServer(ThreadingHTTPServer):
    """An HTTP server holding one frozen model (per task) and at most one :class:`BackboneSession`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: str, device: str = "cpu"):
        super().__init__(address, _Handler)
        self.model_name = model
        self.device = device
        self.models: dict[tuple[str, int | None], nn.Module] = {}
        self.session: BackboneSession | None = None
        self.lock = threading.Lock()
        self.stats = {"sessions": 0, "requests": 0, "bytes_in": 0, "bytes_out": 0}

    def model_for(self, task: str, num_labels: int | None) -> nn.Module:
        """The frozen model for ``task`` (loaded once per task and label count), in eval mode."""
        key = (task, num_labels)
        if key not in self.models:
            model, _ = peftlab.zoo.load(self.model_name, task=task, num_labels=num_labels)
            for p in model.parameters():
                p.requires_grad_(False)
            self.models[key] = model.to(self.device).eval()
        return self.models[key]

    def open_session(self, header: dict[str, Any]) -> Message:
        """Check the client's module list against the model and start a session over it."""
        modules = header.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise SplitError("/open needs 'modules': the modules the client's adapter is placed on")
        model = self.model_for(str(header.get("task", "classification")), header.get("num_labels"))
        known = dict(model.named_modules())
        for name, want in modules.items():
            if name not in known:
                raise SplitError(f"the server's model ({self.model_name}) has no module {name!r}: "
                                 "client and server must load the same model")
            weight = getattr(known[name], "weight", None)
            if want.get("shape") is not None and weight is not None and list(weight.shape) != want["shape"]:
                raise SplitError(f"module {name!r} has weight shape {list(weight.shape)} on the server, "
                                 f"{want['shape']} on the client: client and server must load the same model")
        if self.session is not None:
            self.session.close()
        self.session = BackboneSession(model, modules)
        self.stats["sessions"] += 1
        return {"kind": "opened", "model": self.model_name, "class": type(model).__name__,
                "device": str(self.device), "modules": len(modules)}, {}

    def handle_message(self, path: str, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Message:
        """Route one request (see the module docstring)."""
        if path == "/open":
            with self.lock:
                return self.open_session(header)
        session = self.session
        if session is None:
            raise SplitError(f"{path}: no session; POST /open first")
        if path == "/forward":
            return session.start(session.forward_job(tensors, bool(header.get("train")), bool(header.get("grad"))))
        if path == "/backward":
            if "grad" not in tensors:
                raise SplitError("/backward needs the tensor 'grad' (dL/dlogits)")
            return session.start(session.backward_job(tensors["grad"]))
        if path == "/answer":
            return session.answer(header, tensors)
        if path == "/close":
            session.close()
            self.session = None
            return {"kind": "closed"}, {}
        raise SplitError(f"unknown route {path}; routes: /open, /forward, /backward, /answer, /close")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client
    # Headers and body go out in two writes: with Nagle's algorithm, the client's delayed ACK of the
    # first would hold the second back (~40 ms a reply).
    disable_nagle_algorithm = True
    server: SplitServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return

    def _send(self, status: int, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if content_type == "application/octet-stream":  # the protocol's traffic, not /health
            self.server.stats["bytes_out"] += len(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/health":
            self._send(404, json.dumps({"error": "GET /health only"}).encode(), "application/json")
            return
        self._send(200, json.dumps({"model": self.server.model_name, **self.server.stats}).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        stats = self.server.stats
        stats["requests"] += 1
        stats["bytes_in"] += len(body)
        try:
            header, tensors = decode(body)
            reply = self.server.handle_message(self.path, header, tensors)
        except (SplitError, WireError, ValueError, KeyError, OSError) as err:
            self._send(400, encode({"kind": "error", "message": f"{type(err).__name__}: {err}"}))
            return
        self._send(200, encode(*reply))


def serve(model: str, host: str = "127.0.0.1", port: int = 0, device: str = "cpu", preload: str | None = None,
          num_labels: int | None = None) -> None:
    """Serve ``model`` until interrupted; prints ``listening on http://HOST:PORT`` (port 0: a free one)
    once ready. ``preload`` loads the model for that task before listening."""
    server = SplitServer((host, port), model, device)
    if preload:
        server.model_for(preload, num_labels)
    print(f"peftlab split serve: {model} on {device}, listening on http://{host}:{server.server_address[1]}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if server.session is not None:
            server.session.close()
        server.server_close()
