"""A real ``peftlab serve`` process for the server tests, and plain-HTTP helpers for it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: ``Server.http``'s default: send the server's own API key.
OWN_KEY = object()


@contextlib.contextmanager
def serve_process(args: list[str], log: Path, key: str | None = None) -> Iterator["Server"]:
    """``python -m peftlab serve ARGS --port 0`` as a real process (its stderr in ``log``), yielded
    once ``/health`` answers; terminated afterwards. ``key``: the ``--api-key`` in ``args``, if any."""
    cmd = [sys.executable, "-m", "peftlab", "serve", *args, "--port", "0"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline()  # printed once the model and adapters are loaded
        match = re.search(r"on (http://\S+)/v1 ", line)
        assert match, f"no address line from peftlab serve: {line!r}\n{log.read_text()[-3000:]}"
        srv = Server(proc, match.group(1), log, key)
        deadline = time.monotonic() + 60
        while srv.health() != 200:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class Server:
    """A running ``peftlab serve`` process and plain-HTTP helpers for it."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path, key: str | None = None):
        self.proc, self.url, self.log, self.key = proc, url, log, key

    def http(self, method: str, path: str, body: Any = None, key: Any = OWN_KEY,
             raw: bytes | None = None) -> tuple[int, dict[str, str], str]:
        """``(status, headers, body text)`` of one request (errors included, not raised); ``key``:
        the server's own API key unless given (None: no Authorization header)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"}
        key = self.key if key is OWN_KEY else key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()

    def health(self) -> int | None:
        """The status of ``GET /health``, or None while nothing answers."""
        try:
            return self.http("GET", "/health", key=None)[0]
        except urllib.error.URLError:
            return None

    def error(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        """An error response: its status, its ``error`` object (OpenAI's shape checked) and headers."""
        status, headers, text = self.http(method, path, body, **kw)
        payload = json.loads(text)
        assert set(payload) == {"error"} and {"message", "type", "param", "code"} <= set(payload["error"]), payload
        assert payload["error"]["message"], payload
        return status, payload["error"], headers

    def complete(self, model: str, prompt: str, max_tokens: int = 8) -> str:
        """The greedy completion's text over plain HTTP (asserting a 200). A 429 is retried after its
        Retry-After, as the openai client does."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        status, headers, text = self.http("POST", "/v1/completions", body)
        for _ in range(20):
            if status != 429:
                break
            time.sleep(float(headers["retry-after"]))
            status, headers, text = self.http("POST", "/v1/completions", body)
        assert status == 200, text
        return json.loads(text)["choices"][0]["text"]
