"""Who may talk to a server, and where a running server says how to reach it.

Every local user can connect to a loopback port, so a TCP or HTTP server always wants a token. The
token never travels on the command line (`ps` shows argv to every user): it comes from the
environment (`LONGLLAMA_TOKEN`), from a private file (`--token-file`, regular, ours, mode 0600), or is
made fresh and published in a *server record*: a private JSON file in a private runtime directory
that tells this user's own tools (`longllama complete`, `ask`) the port and token of a running
server, so they can reuse its loaded model instead of loading one per call.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LongLlamaError
from .safefile import UnsafeFile, read_private, write_private
from .user_cache import cache_dir

TOKEN_ENV = "LONGLLAMA_TOKEN"
MAX_PRIVATE_FILE = 64 * 1024  # bytes; a token file or server record is tiny


class AuthError(LongLlamaError):
    """A token file or runtime directory that other users could read or replace."""


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/longllama, else <cache>/run: created 0700; refused if a link or not ours."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        path = Path(base) / "longllama"
    else:
        path = cache_dir() / "run"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise AuthError(f"{path} is not a directory owned by you: refusing to keep server tokens there")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def read_private_file(path: str | os.PathLike) -> str:
    """The text of a file only this user can read; AuthError otherwise (never follows a final symlink)."""
    try:
        data = read_private(path, MAX_PRIVATE_FILE + 1)
    except UnsafeFile as exc:
        raise AuthError(str(exc)) from None
    except OSError as exc:
        raise AuthError(f"cannot open {path}: {exc.strerror}") from exc
    if len(data) > MAX_PRIVATE_FILE:
        raise AuthError(f"{path} is larger than {MAX_PRIVATE_FILE} bytes")
    return data.decode("utf-8", errors="replace")


def server_token(token_file: str | os.PathLike | None = None) -> tuple[str, bool]:
    """The token clients must present: $LONGLLAMA_TOKEN, else the token file, else a fresh random one;
    and whether it is that fresh one (then only a server record can tell this user's tools)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], False
    if token_file is not None:
        token = read_private_file(token_file).strip()
        if not token:
            raise AuthError(f"{token_file} is empty")
        return token, False
    return secrets.token_urlsafe(32), True


def tokens_match(given: object, expected: str) -> bool:
    """Constant-time comparison; anything but a string is a mismatch."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def root_refusal(root: str | os.PathLike, allowed: Sequence[Path] = ()) -> str | None:
    """Why a server shared over TCP must not index `root` for a client, or None. A client can name any
    folder; the server reads it with its own rights and writes `.longllama/` into it, so it takes only
    folders its user owns, or under one it was started with (`--allow-root DIR`, resolved)."""
    path = Path(root).resolve()
    if any(path == a or path.is_relative_to(a) for a in allowed):
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot use it: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return (f"owned by uid {st.st_uid}, not by the server's user (uid {os.geteuid()}); start the server "
                f"with --allow-root {path} to share it")
    return None


@dataclass
class ServerRecord:
    """What a running server publishes for this user's own tools."""

    pid: int
    host: str
    port: int
    token: str
    protocol: str = "lsp"  # "lsp" (TCP, one LSP session per connection) or "http" (OpenAI-compatible)
    roots: list[str] = field(default_factory=list)  # repositories the server has open now

    @property
    def path(self) -> Path:
        return runtime_dir() / f"server-{self.protocol}-{self.pid}-{self.port}.json"


def publish(record: ServerRecord) -> Path:
    """Write (or rewrite) the record atomically, mode 0600."""
    path = record.path
    write_private(path, json.dumps(asdict(record)).encode())
    return path


def unpublish(record: ServerRecord) -> None:
    try:
        record.path.unlink()
    except FileNotFoundError:
        pass


def running_servers(protocol: str = "lsp") -> list[ServerRecord]:
    """This user's live servers of one protocol; records of dead processes are removed."""
    found = []
    for path in sorted(runtime_dir().glob(f"server-{protocol}-*.json")):
        try:
            record = ServerRecord(**json.loads(read_private_file(path)))
        except (AuthError, ValueError, TypeError):
            continue
        if _alive(record.pid):
            found.append(record)
        else:
            path.unlink(missing_ok=True)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process reusing the pid: not our server
        return False
    return True
