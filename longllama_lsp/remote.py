"""The command line as a client of a running `longllama serve --tcp` (issue 19).

`longllama complete` and `ask` load the model on every call (seconds to minutes). When this user
runs a TCP server that has the same repository open, its server record (auth.py: port, token,
roots) lets them ask that server instead: connect to 127.0.0.1, `initialize` with the token and the
repository as the workspace folder (the server joins the open root: nothing is indexed again), send
the file, run one request, `shutdown`, `exit`. A plain JSON-RPC client over a socket: the CLI never
imports the server or pygls (tests/test_layering.py).

`longllama servers` lists this user's running servers, with their tokens, for editors that connect
over TCP.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .auth import ServerRecord, running_servers
from .cli import Command, shown
from .errors import LongLlamaError
from .framing import frame_message, read_frame

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
INDEXED = ("watching", "idle", "off", "error")  # the session's indexing states once its memory is ready


class Unreachable(Exception):
    """The server did not answer as a server should: the caller loads the model itself."""


class ServerError(LongLlamaError):
    """The server answered a request with an error."""


def find_server(repo: Path) -> ServerRecord | None:
    """This user's live LSP server with `repo` open, if any (the newest record first)."""
    root = repo.resolve()
    for record in reversed(running_servers("lsp")):
        if any(Path(r) == root for r in record.roots):
            return record
    return None


def listener_uids(host: str, port: int, proc_net: Path = Path("/proc/net")) -> set[int] | None:
    """The uids owning a listening TCP socket that takes connections to host:port (bound to host or to
    the wildcard address), from /proc/net/tcp{,6}; None where there is no /proc (not Linux)."""
    try:
        address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        return None
    wanted = {("tcp", address), ("tcp", ipaddress.ip_address("0.0.0.0")), ("tcp6", ipaddress.ip_address("::"))}
    if address.version == 4:
        wanted.add(("tcp6", ipaddress.ip_address(f"::ffff:{address}")))
    else:
        wanted = {("tcp6", address), ("tcp6", ipaddress.ip_address("::"))}
    uids, found_table = set(), False
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc_net / table).read_text().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            local, state, uid = fields[1], fields[3], fields[7]
            hex_address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port and (table, _proc_address(hex_address)) in wanted:
                uids.add(int(uid))
    return uids if found_table else None


def _proc_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's address: 32-bit words in host byte order."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def check_listener(record: ServerRecord) -> None:
    """Unreachable unless what listens on the record's port is this user's: after the server died
    (kill -9 leaves its record) and its pid was reused, another local user may listen there, and the
    client would send it the token and the user's file."""
    uids = listener_uids(record.host, record.port)
    if uids is None:
        return  # no /proc: nothing to check with (the record folder is still private)
    if uids != {os.geteuid()}:
        owners = ", ".join(str(u) for u in sorted(uids)) or "nobody listens"
        raise Unreachable(f"{record.host}:{record.port} is not this user's server (listening uid: {owners})")


class LspConnection:
    """One LSP session over TCP: Content-Length frames of JSON, requests answered in order of need."""

    def __init__(self, record: ServerRecord, timeout: float):
        check_listener(record)
        try:
            self.sock = socket.create_connection((record.host, record.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise Unreachable(f"cannot connect to {record.host}:{record.port}: {exc}") from None
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("rb")
        self.ids = itertools.count(1)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.sendall(frame_message({"jsonrpc": "2.0", **message}))
        except OSError as exc:
            raise Unreachable(f"the server closed the connection: {exc}") from None

    def notify(self, method: str, params: Any) -> None:
        self.send({"method": method, "params": params})

    def request(self, method: str, params: Any = None) -> Any:
        msg_id = next(self.ids)
        self.send({"id": msg_id, "method": method, **({"params": params} if params is not None else {})})
        while True:
            msg = self._read()
            if "method" in msg:
                if "id" in msg:  # a request of the server's (progress, configuration): no answer needed here
                    self.send({"id": msg["id"], "result": None})
                continue
            if msg.get("id") != msg_id:
                continue
            if "error" in msg:
                error = msg["error"] if isinstance(msg["error"], dict) else {}
                raise ServerError(f"the server refused {method}: {error.get('message', error)}")
            return msg.get("result")

    def _read(self) -> dict[str, Any]:
        try:
            body = read_frame(self.reader)
            if body is None:
                raise Unreachable("the server closed the connection")
            msg = json.loads(body)
        except (OSError, ValueError) as exc:  # a timeout, a bad frame (FrameError), a body that is not JSON
            raise Unreachable(f"no answer from the server: {exc}") from None
        if not isinstance(msg, dict):
            raise Unreachable(f"the server sent a {type(msg).__name__}, not a JSON-RPC message")
        return msg

    def close(self) -> None:
        try:
            self.request("shutdown")
            self.notify("exit", None)
        except (Unreachable, ServerError):
            pass
        self.sock.close()


def session(record: ServerRecord, repo: Path, settings: dict[str, Any], timeout: float,
            memory: bool) -> LspConnection:
    """An initialized session with `repo` as its folder; with memory, once the server has it indexed."""
    conn = LspConnection(record, timeout)
    try:
        root = repo.resolve()
        conn.request("initialize", {"processId": None, "rootUri": root.as_uri(), "capabilities": {},
                                    "workspaceFolders": [{"uri": root.as_uri(), "name": root.name}],
                                    "initializationOptions": {**settings, "token": record.token}})
        conn.notify("initialized", {})
        if memory:
            deadline = time.monotonic() + timeout
            while (state := conn.request("longllama/status")["indexing"]) not in INDEXED:
                if time.monotonic() > deadline:
                    raise Unreachable(f"the server is still indexing {root} ({state})")
                time.sleep(0.2)
    except BaseException:
        conn.sock.close()
        raise
    return conn


def utf16_column(line_text: str, col: int) -> int:
    """An LSP position's character (UTF-16 units) for the 0-based code-point column `col`."""
    return len(line_text[:col].encode("utf-16-le")) // 2


def complete(record: ServerRecord, repo: Path, path: Path, text: str, line: int, col: int, line_text: str,
             settings: dict[str, Any], memory: bool, timeout: float = 600) -> str:
    """The inline completion at 0-based `line`, `col` (code points) of `path` holding `text`."""
    conn = session(record, repo, settings, timeout, memory)
    try:
        uri = path.resolve().as_uri()
        conn.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "", "version": 1,
                                                              "text": text}})
        result = conn.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": utf16_column(line_text, col)},
            "context": {"triggerKind": 1}})  # Invoked: no debounce
        items = (result or {}).get("items") or []
        return items[0]["insertText"] if items else ""
    finally:
        conn.close()


def ask(record: ServerRecord, repo: Path, question: str, settings: dict[str, Any], memory: bool,
        timeout: float = 600) -> dict[str, Any]:
    """The server's longllama/ask result (protocol.AskResult as JSON)."""
    conn = session(record, repo, settings, timeout, memory)
    try:
        return conn.request("longllama/ask", {"question": question})
    finally:
        conn.close()


# -- longllama servers --------------------------------------------------------------------------------------

def add_servers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the records as JSON (port, token, roots)")


def run_servers(args: argparse.Namespace) -> int:
    records = running_servers("lsp") + running_servers("http")
    if args.json:
        print(json.dumps([vars(r) for r in records], indent=2))
        return 0
    if not records:
        print("no running servers (start one with `longllama serve --tcp`)")
    for r in records:
        roots = ", ".join(shown(root) for root in r.roots) or "no repository open"  # a cloned repo's name
        print(f"{r.protocol} pid {r.pid} on {r.host}:{r.port}: {roots}\n  token: {r.token}")
    return 0


servers = Command(add_servers_arguments, run_servers, description=(
    "List your running servers (`longllama serve --tcp`, the HTTP server): address, open repositories "
    "and the token a client sends (initializationOptions.token). Only you can read these records."))
