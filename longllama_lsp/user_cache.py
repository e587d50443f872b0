"""The user's cache directory: converted models (resolve.py) and, without $XDG_RUNTIME_DIR, server
records (auth.py). Its own module because resolve imports the model package (torch): finding a
running server must not pay for that."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "LONGLLAMA_CACHE"


def cache_dir() -> Path:
    """$LONGLLAMA_CACHE, else $XDG_CACHE_HOME/longllama, else ~/.cache/longllama."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "longllama"
