"""peftlab's on-disk cache of converted models, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_VAR = "PEFTLAB_CACHE"
MARKER = "peftlab-cache.json"
#: Temporary build directories older than this are leftovers of killed processes.
STALE_AFTER_S = 3600.0


def cache_root() -> Path:
    """The cache root: ``$PEFTLAB_CACHE`` if set, else ``~/.cache/peftlab``."""
    configured = os.environ.get(ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "peftlab"


def read_marker(entry: Path) -> dict[str, Any] | None:
    """The metadata a completed cache entry carries, or None if ``entry`` is absent or incomplete."""
    try:
        return json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_builds(entry: Path) -> None:
    """Delete temporary build directories of ``entry`` left behind by killed processes."""
    now = time.time()
    for leftover in entry.parent.glob(f".{entry.name}.*"):
        try:
            if now - leftover.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def build_entry(entry: Path, write: Callable[[Path], None], metadata: dict[str, Any]) -> None:
    """Create cache directory ``entry`` atomically.

    ``write(tmp)`` fills a fresh temporary sibling directory; ``metadata`` is then written to
    its marker file, and only then is the directory renamed to ``entry``. A crash or Ctrl-C in
    ``write`` therefore never leaves a half-written ``entry`` behind (the temporary directory is
    removed, or swept up by a later build if the process was killed outright). If another
    process completed ``entry`` first its result is kept; an incomplete or outdated ``entry``
    is replaced.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished entry is an ordinary directory
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        try:
            os.rename(tmp, entry)
        except OSError:
            if read_marker(entry) == metadata:  # a concurrent build won the race
                return
            old = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old-", dir=entry.parent))
            os.rename(entry, old / entry.name)
            os.rename(tmp, entry)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
