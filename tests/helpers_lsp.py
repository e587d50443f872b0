"""A synchronous raw JSON-RPC client for the real `longllama-lsp` process (stdio or TCP).

Used by tests/test_reliability.py and tests/test_security.py: frames are written by hand (so tests
can send broken ones), a reader thread parses the server's frames into a queue, and `request()`
waits for the reply with a given id. Server->client requests are answered with null.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from longllama_lsp.framing import frame_message, read_frame

TESTS = Path(__file__).parent


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a server process (`extra`: e.g. LONGLLAMA_TOKEN for a TCP server)."""
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", **extra}


def server_command(model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "longllama_lsp.server", "--model", str(model_dir), *extra]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class SyncClient:
    """One connection to a server: `send_raw` bytes, `notify`, `request` (waits for the reply)."""

    def __init__(self, read, write, close=None):
        self._read, self._write, self._close = read, write, close
        self.replies: dict[object, dict] = {}
        self.received_at: dict[object, float] = {}  # reply id -> time.monotonic() when it was read
        self.notifications: list[dict] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.eof = False
        threading.Thread(target=self._pump, daemon=True).start()

    @classmethod
    def over_process(cls, proc: subprocess.Popen) -> SyncClient:
        def write(data: bytes) -> None:
            proc.stdin.write(data)
            proc.stdin.flush()
        return cls(proc.stdout, write)

    @classmethod
    def over_tcp(cls, host: str, port: int, timeout: float = 120) -> SyncClient:
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        sock.settimeout(None)

        def close() -> None:  # the reader's file holds the socket open: shut it down for real
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        client = cls(sock.makefile("rb"), sock.sendall, close)
        client.sock = sock
        return client

    def _pump(self) -> None:
        try:
            while True:
                body = read_frame(self._read, max_bytes=1 << 30)  # the server under test may answer big
                if body is None:
                    raise EOFError
                msg = json.loads(body)
                if "method" in msg and "id" in msg:  # e.g. window/workDoneProgress/create
                    self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
                    continue
                with self._cond:
                    if "method" in msg:
                        self.notifications.append(msg)
                    else:
                        key = msg.get("id")
                        key = key if not isinstance(key, list) else json.dumps(key)
                        self.replies[key] = msg
                        self.received_at[key] = time.monotonic()
                    self._cond.notify_all()
        except (EOFError, OSError, ValueError):
            with self._cond:
                self.eof = True
                self._cond.notify_all()

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            self._write(data)

    def send(self, message: dict) -> None:
        self.send_raw(frame_message(message))

    def notify(self, method: str, params) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def next_id(self) -> str:
        return f"t-{next(self._ids)}"

    def wait_reply(self, msg_id, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while msg_id not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise AssertionError(f"no reply to {msg_id!r} (eof={self.eof})")
                self._cond.wait(left)
            return self.replies.pop(msg_id)

    def wait_null_reply(self, timeout: float = 30) -> dict:
        return self.wait_reply(None, timeout)

    def request(self, method: str, params=None, timeout: float = 60, msg_id=None) -> dict:
        msg_id = msg_id if msg_id is not None else self.next_id()
        message = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return self.wait_reply(msg_id, timeout)

    def initialize(self, root: Path, options: dict | None = None, timeout: float = 120) -> dict:
        reply = self.request("initialize", {"processId": None, "rootUri": root.as_uri(), "capabilities": {},
                                            "workspaceFolders": [{"uri": root.as_uri(), "name": root.name}],
                                            "initializationOptions": options or {}}, timeout)
        self.notify("initialized", {})
        return reply

    def open(self, uri: str, text: str, version: int = 1) -> None:
        self.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python",
                                                              "version": version, "text": text}})

    def complete(self, uri: str, line: int, character: int, timeout: float = 120, msg_id=None) -> dict:
        return self.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 1}}, timeout, msg_id)

    def status(self, timeout: float = 60) -> dict:
        return self.request("longllama/status", None, timeout)["result"]

    def close(self) -> None:
        if self._close:
            self._close()

    def abort(self) -> None:
        """Drop a TCP connection abruptly: a reset (SO_LINGER 0), no shutdown/exit, replies unread."""
        sock = self.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)  # wakes the reader thread locally; nothing is sent
        deadline = time.monotonic() + 5
        while not self.eof and time.monotonic() < deadline:
            time.sleep(0.01)
        self._read.close()
        sock.close()  # last reference: the kernel sends RST


def wait_until(predicate, timeout: float = 60, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- load: editors looping over one server ---------------------------------------------------------------

CANCELLED = -32800  # RequestCancelled


@dataclass
class LoadStats:
    """What a load run saw; lists are appended to from the editor threads (list.append is atomic)."""

    latencies: list[float] = field(default_factory=list)  # seconds, every request with a reply
    waited: list[float] = field(default_factory=list)  # seconds, the completions waited for (C in editor_loop)
    answered: list[str] = field(default_factory=list)  # request ids with a result
    cancelled: list[str] = field(default_factory=list)  # request ids answered with RequestCancelled
    failures: list[str] = field(default_factory=list)  # any other error, a timeout, a lost reply

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            values = sorted(values)
            return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else float("nan")
        return {"requests": len(self.answered) + len(self.cancelled) + len(self.failures),
                "answered": len(self.answered), "cancelled": len(self.cancelled), "failures": len(self.failures),
                "p50_s": pct(self.latencies, 0.5), "p95_s": pct(self.latencies, 0.95),
                "max_s": pct(self.latencies, 1.0), "waited_p50_s": pct(self.waited, 0.5),
                "waited_p95_s": pct(self.waited, 0.95)}


def editor_loop(client: SyncClient, uri: str, text: str, line: int, character: int, rounds: int,
                stats: LoadStats, timeout: float = 60) -> None:
    """A bounded editing session on `uri` (opened here), `line`:`character` at the end of a word.

    Each round: a completion (A) left in flight, an edit (A is stale now), a completion (B) cancelled
    at once with $/cancelRequest, a completion (C) waited for; then the replies to A and B. Every
    request must get a result or RequestCancelled within `timeout` s; the edit alternately types and
    deletes one character at the cursor. 3 requests and 1 edit per round."""
    version = 1

    def inline(col: int) -> str:
        msg_id = client.next_id()
        sent[msg_id] = time.monotonic()
        client.send({"jsonrpc": "2.0", "id": msg_id, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": col},
            "context": {"triggerKind": 1}}})
        return msg_id

    def collect(msg_id: str, waited: bool = False) -> None:
        try:
            reply = client.wait_reply(msg_id, timeout)
        except AssertionError as exc:
            stats.failures.append(f"{uri} {msg_id}: {exc}")
            return
        stats.latencies.append(client.received_at.pop(msg_id, time.monotonic()) - sent.pop(msg_id))
        if waited:
            stats.waited.append(stats.latencies[-1])
        if "result" in reply:
            stats.answered.append(msg_id)
        elif reply.get("error", {}).get("code") == CANCELLED:
            stats.cancelled.append(msg_id)
        else:
            stats.failures.append(f"{uri} {msg_id}: {reply}")

    sent: dict[str, float] = {}
    client.open(uri, text)
    col = character
    for r in range(rounds):
        a = inline(col)
        version += 1
        typed = r % 2 == 0
        change = {"range": {"start": {"line": line, "character": col},
                            "end": {"line": line, "character": col if typed else col - 1}}, "text": "e" if typed else ""}
        col = col + 1 if typed else col - 1
        client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version},
                                                 "contentChanges": [change]})
        b = inline(col)
        client.notify("$/cancelRequest", {"id": b})
        c = inline(col)
        collect(c, waited=True)
        collect(a)
        collect(b)
