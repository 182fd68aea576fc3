"""The client's HTTP connection to ``peftlab split serve``, counting every byte it moves."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any

from peftlab.train.split.backbone import SplitError
from peftlab.train.split.wire import Tensors, decode, encode


@dataclass
class Traffic:
    """Requests and body bytes (HTTP headers, about 150 bytes a request, not counted)."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def bytes_total(self) -> int:
        """Bytes both ways."""
        return self.bytes_sent + self.bytes_received

    def minus(self, earlier: Traffic) -> Traffic:
        """The traffic since ``earlier`` (a copy taken then)."""
        return Traffic(self.requests - earlier.requests, self.bytes_sent - earlier.bytes_sent,
                       self.bytes_received - earlier.bytes_received)

    def copy(self) -> Traffic:
        """A snapshot."""
        return Traffic(self.requests, self.bytes_sent, self.bytes_received)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``http://HOST:PORT``) as ``(host, port)``; :class:`SplitError` otherwise."""
    text = address.removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SplitError(f"--server {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8790")
    return host, int(port)


class _NoDelayConnection(http.client.HTTPConnection):
    """An HTTP connection with Nagle's algorithm off: a message's last small segment is not held back
    waiting for the server's (delayed) acknowledgement of the previous ones."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SplitConnection:
    """One keep-alive HTTP connection; :meth:`post` sends a message and returns the reply message."""

    def __init__(self, address: str, timeout: float = 900.0):
        self.address = address
        self.host, self.port = parse_address(address)
        self.conn = _NoDelayConnection(self.host, self.port, timeout=timeout)
        self.traffic = Traffic()

    def post(self, path: str, header: dict[str, Any], tensors: Tensors | None = None) -> tuple[dict[str, Any], Tensors]:
        """POST one message to ``path``; raises :class:`SplitError` with the server's message on an error reply."""
        body = encode(header, tensors)
        try:
            self.conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
            response = self.conn.getresponse()
            data = response.read()
        except (ConnectionError, OSError, http.client.HTTPException) as err:
            self.conn.close()
            raise SplitError(f"cannot reach the split server at {self.address} ({type(err).__name__}: {err}); "
                             "start it with: peftlab split serve --model M --port P") from None
        self.traffic.requests += 1
        self.traffic.bytes_sent += len(body)
        self.traffic.bytes_received += len(data)
        reply, tensors_back = decode(data)
        if reply.get("kind") == "error":
            raise SplitError(f"split server: {reply.get('message')}")
        return reply, tensors_back

    def health(self) -> dict[str, Any]:
        """GET /health: the server's model and counters; :class:`SplitError` when the server is not there."""
        try:
            self.conn.request("GET", "/health")
            response = self.conn.getresponse()
            return json.loads(response.read())
        except (ConnectionError, OSError, http.client.HTTPException, ValueError) as err:
            self.conn.close()
            raise SplitError(f"cannot reach the split server at {self.address} ({type(err).__name__}: {err}); "
                             "start it with: peftlab split serve --model M --port P") from None

    def close(self) -> None:
        """End the session on the server (if it is still there) and close the connection."""
        try:
            self.post("/close", {})
        except SplitError:
            pass
        self.conn.close()
