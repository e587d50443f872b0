"""Which index rows this user wrote: a per-user secret key signs every stored memory.

A repository can ship its own `.longllama/` (committed, or in a tarball): memories in it would steer
the model (a poisoned cache), and they are keyed by content (memory key), so they would be reused silently.
Every memory row therefore carries a keyed BLAKE2b MAC of its bytes; the key is 32 random bytes made
once per user, mode 0600, in `$XDG_CONFIG_HOME/longllama/index.key` (default ~/.config), and never
leaves the machine. A row without a valid MAC is never used: the writer drops it and the pipeline
encodes that content again. (BLAKE2b, not HMAC-SHA256: as strong a MAC, and ~2x faster without
SHA CPU extensions; memories are read at ~400 MiB/s.)
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from longllama_lsp.errors import StoreError
from longllama_lsp.safefile import UnsafeFile, read_private, write_private

KEY_BYTES = 32


def key_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "longllama" / "index.key"


def user_key() -> bytes:
    """This user's signing key, created on first use."""
    return _load_or_create(key_path())


@functools.cache
def _load_or_create(path: Path) -> bytes:
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, secrets.token_bytes(KEY_BYTES), replace=False)  # another process's key may win
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        key = read_private(path, KEY_BYTES + 1)
    except UnsafeFile as e:
        raise StoreError(f"the index signing key {e}; it must be a regular file owned by you with mode 0600: "
                         "delete it to make a new one") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StoreError(f"cannot read the index signing key {path}: {e}") from e
    if len(key) != KEY_BYTES:
        raise StoreError(f"the index signing key {path} has {len(key)} bytes, not {KEY_BYTES}; "
                         "delete it to make a new one")
    return key


def sign(key: bytes, *parts: bytes | str | None) -> bytes:
    """A 32-byte MAC of `parts`, each length-prefixed so no two part lists collide."""
    h = hashlib.blake2b(key=key, digest_size=32, person=b"longllama-index")
    for part in parts:
        data = b"" if part is None else part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") if part is not None else b"\xff" * 8)
        h.update(data)
    return h.digest()


def verify(key: bytes, mac: bytes | None, *parts: bytes | str | None) -> bool:
    return mac is not None and hmac.compare_digest(bytes(mac), sign(key, *parts))
