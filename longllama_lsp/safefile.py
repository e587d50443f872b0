"""Opening files a hostile party may have placed: a repository's files, a token file, the signing key.

One set of checks for all of them: never follow a final symlink (unless asked), never block on a FIFO
(O_NONBLOCK), and decide on what was actually opened (fstat of the descriptor), not on an earlier
lstat a swap could have outrun. A leaf module (os only): the indexer and the server both use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class UnsafeFile(Exception):
    """`path` is not a regular file (or, for read_private, not private to this user); `reason` says what
    it is, as in f"{path} is {reason}"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path} is {reason}")


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o600, *,
                 follow_symlinks: bool = False) -> int:
    """os.open(path, flags, mode) onto a regular file: UnsafeFile for a symlink (unless follow_symlinks),
    FIFO, device, socket or directory. O_NONBLOCK makes a FIFO open at once; fstat then tells."""
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, mode)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_symlinks:
            raise UnsafeFile(path, "a symlink") from None
        if err.errno in (errno.EISDIR, errno.ENXIO):  # a directory opened for writing; a FIFO without a reader
            kind = "a directory" if err.errno == errno.EISDIR else "a FIFO or socket"
            raise UnsafeFile(path, f"not a regular file ({kind})") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((f" ({what})" for test, what in _KINDS if test(st.st_mode)), "")
        raise UnsafeFile(path, f"not a regular file{kind}")
    return fd


def read_regular(path: str | os.PathLike, limit: int, *, follow_symlinks: bool = False
                 ) -> tuple[bytes, os.stat_result]:
    """At most `limit` bytes of the regular file `path`, and its fstat (size and mtime of what was read)."""
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit), os.fstat(fd)


def read_private(path: str | os.PathLike, limit: int) -> bytes:
    """At most `limit` bytes of a regular file owned by this user that no one else may read or write."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UnsafeFile(path, f"owned by uid {st.st_uid}, not by you (uid {os.geteuid()})")
        if st.st_mode & 0o077:
            raise UnsafeFile(path, f"readable or writable by other users (mode {stat.filemode(st.st_mode)}): "
                                   f"chmod 600 {path}")
        return f.read(limit)


def write_private(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> bool:
    """Write `data` to `path` atomically, mode 0600: readers see the old file or the whole new one.
    replace=False keeps a `path` that exists (another process made it first); False is returned then."""
    path = os.fspath(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic, and fails if the file exists
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):  # gone once replaced; left by a failure or by link
            os.unlink(tmp)
