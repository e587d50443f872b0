"""Which index rows this user wrote: a per-user secret key signs every stored memory.

A repository can ship its own `.longllama/` (committed, or in a tarball): memories in it would steer
the model (a poisoned cache), and they are keyed by content hash, so they would be reused silently.
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
import stat
from pathlib import Path

from longllama_lsp.errors import StoreError

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
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if another process made the key first: theirs wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise StoreError(f"cannot read the index signing key {path}: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise StoreError(f"the index signing key {path} must be a regular file owned by you with mode 0600 "
                             f"(it is {stat.filemode(st.st_mode)}, uid {st.st_uid}); delete it to make a new one")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
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
