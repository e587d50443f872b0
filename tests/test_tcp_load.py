"""Load over TCP (issue #9): N editors connected at once to one `longllama-lsp --tcp` process.

Test Data: the seeded tiny LongLLaMA + SmolLM2 tokenizer (tests/helpers_models.py), 1024-token window,
one `--no-index --tcp` process (token in $LONGLLAMA_TOKEN) on a free 127.0.0.1 port for the module. Each connection is its own
LSP session sharing the one model. The clients loop (tests/helpers_lsp.editor_loop: completions left
in flight, edits that make them stale, completions cancelled with $/cancelRequest) with timeouts: every
request must get a result or RequestCancelled, a client that resets its socket or exits must not
disturb the others, and the process must stay up and keep serving new clients.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers_lsp import (
    LoadStats,
    SyncClient,
    editor_loop,
    free_port,
    rss_kib,
    server_command,
    server_env,
    wait_until,
)
from helpers_models import smol_tokenizer_dir, write_tiny_model  # noqa: F401

SOURCE = 'import os\n\n\ndef greet(name):\n    """Say hello."""\n    print("hello", name)\n\n\ndef main():\n    gre'
TOKEN = "s3cret"
OPTIONS = {"completion": {"maxTokens": 4, "debounceMs": 0}, "ask": {"maxTokens": 4}, "token": TOKEN}
CLIENTS, ROUNDS = 4, 8


@pytest.fixture(scope="module")
def model_dir(smol_tokenizer_dir, tmp_path_factory) -> Path:  # noqa: F811
    return write_tiny_model(tmp_path_factory.mktemp("tiny-tcp"), smol_tokenizer_dir, max_position_embeddings=1024)


def start(model_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(server_command(model_dir, "--no-index", "--tcp", "--port", str(port), *extra),
                            env=server_env(LONGLLAMA_TOKEN=TOKEN), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def connect(port: int, root: Path, options: dict | None = None) -> SyncClient:
    client = SyncClient.over_tcp("127.0.0.1", port, timeout=120)
    reply = client.initialize(root, OPTIONS if options is None else options, timeout=120)
    assert "result" in reply, reply
    return client


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port, root = free_port(), tmp_path_factory.mktemp("ws")
    proc = start(model_dir, port, "--log-file", str(root.parent / "tcp.log"))
    proc.port, proc.root, proc.log = port, root, root.parent / "tcp.log"
    warm = connect(port, proc.root)  # loads the model; ends with a clean shutdown + exit
    uri = (proc.root / "warm.py").as_uri()
    warm.open(uri, SOURCE)
    assert warm.complete(uri, 9, 7)["result"]["items"]
    assert warm.request("shutdown")["result"] is None
    warm.notify("exit", None)
    wait_until(lambda: warm.eof, 30)
    yield proc
    proc.kill()
    out, _ = proc.communicate()
    assert out == b""  # nothing on stdout in TCP mode


def test_four_clients_at_once_every_request_answered_or_cancelled(server):
    """4 sessions loop concurrently while a 5th resets its connection mid-frame with requests in flight
    and a 6th exits cleanly: the 4 finish, every request answered or cancelled, and the process serves
    a new client afterwards with nothing left pending."""
    assert server.poll() is None, "the server ended with its first client"
    clients = [connect(server.port, server.root) for _ in range(CLIENTS)]
    dropper, leaver = connect(server.port, server.root), connect(server.port, server.root)
    rss0 = rss_kib(server.pid)
    stats = LoadStats()
    threads = [threading.Thread(target=editor_loop, args=(c, (server.root / f"c{i}.py").as_uri(), SOURCE, 9, 7,
                                                           ROUNDS, stats)) for i, c in enumerate(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    # The dropper: requests in flight, half a frame, then a reset.
    drop_uri = (server.root / "drop.py").as_uri()
    dropper.open(drop_uri, SOURCE)
    for _ in range(3):
        dropper.send({"jsonrpc": "2.0", "id": dropper.next_id(), "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": drop_uri}, "position": {"line": 9, "character": 7},
            "context": {"triggerKind": 1}}})
    dropper.send_raw(b"Content-Length: 500\r\n\r\n{\"jsonrpc\": \"2.0\", \"id\": 1")
    dropper.abort()
    # The leaver: a clean shutdown + exit ends its session only.
    assert leaver.request("shutdown")["result"] is None
    leaver.notify("exit", None)
    wait_until(lambda: leaver.eof, 30)
    for t in threads:
        t.join(120)
    wall = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "deadlock: a client loop never finished"
    numbers = {**stats.summary(), "clients": CLIENTS, "rounds": ROUNDS, "wall_s": round(wall, 2),
               "rss_mb": round(rss_kib(server.pid) / 1024), "rss_growth_mb": round((rss_kib(server.pid) - rss0) / 1024)}
    print("tcp load (4 concurrent sessions, one process):", numbers)
    assert not stats.failures, stats.failures[:3]
    assert numbers["requests"] == CLIENTS * ROUNDS * 3
    assert len(stats.answered) >= CLIENTS * ROUNDS  # C of every round at least
    assert server.poll() is None
    for c in clients:
        status = c.status()
        assert status["engine"] == "ready" and status["documents"] == 1  # its own documents only
    wait_until(lambda: clients[0].status()["pending"] == 0 and clients[0].status()["running"] is None, 30)
    late = connect(server.port, server.root)
    uri = (server.root / "late.py").as_uri()
    late.open(uri, SOURCE)
    assert late.complete(uri, 9, 7)["result"]["items"]
    assert late.status()["documents"] == 1
    for c in [*clients, late]:
        c.close()
    log = server.log.read_text()
    assert "connection lost" in log or "TCP session 6 ended" in log
    assert "Traceback" not in log, log[-3000:]


def test_the_token_is_checked_per_connection(server, tmp_path):
    """An authenticated client does not open the door for the next connection, nor the reverse; a
    wrong or missing token ends the connection after its error reply."""
    good = connect(server.port, tmp_path)
    bad = SyncClient.over_tcp("127.0.0.1", server.port)
    assert bad.request("longllama/status")["error"]["code"] == -32002  # not initialized
    assert bad.initialize(tmp_path, {"token": "wrong"})["error"]["code"] == -32001
    wait_until(lambda: bad.eof, 10)
    assert good.status()["engine"] == "ready"
    none = SyncClient.over_tcp("127.0.0.1", server.port)
    assert none.initialize(tmp_path, {})["error"]["code"] == -32001
    wait_until(lambda: none.eof, 10)
    assert good.status()["version"]
    for c in (good, bad, none):
        c.close()


# -- limits (issue 18): nobody without the token holds a slot; sizes checked before parsing ---------------

def test_unauthenticated_flood_does_not_lock_out_an_editor(server, tmp_path):
    """70 connections that never authenticate (silent, half a header, a wrong token): an editor with the
    token still gets its session at once (before: the 64 silent ones took every slot and the editor's
    initialize got EOF). The silent ones are evicted or time out (pre-initialize timeout, 10 s)."""
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(66)]
    for s in silent[:4]:
        s.sendall(b"Content-Length: 99999")  # half a header, never finished
    editor = connect(server.port, tmp_path)
    assert editor.status()["engine"] == "ready"
    closed = 0
    for s in silent:
        s.settimeout(20)
        try:
            closed += s.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            closed += 1
        s.close()
    assert closed == len(silent)
    print(f"{len(silent)} unauthenticated connections, all closed; the editor was served")
    uri = (tmp_path / "after.py").as_uri()
    editor.open(uri, SOURCE)
    assert editor.complete(uri, 9, 7)["result"]["items"]
    editor.close()


def test_message_over_the_limit_is_skipped_unread(server, tmp_path):
    """A 20 MB didOpen (limit 16 MB) is dropped by its Content-Length, its body read in 64 KB pieces and
    never parsed: RSS grows < 8 MB (before: +20 MB per message, kept), the document is unknown, the
    editor is told why, and the session keeps serving."""
    client = connect(server.port, tmp_path)
    client.status()
    before = rss_kib(server.pid)
    uri = (tmp_path / "huge.py").as_uri()
    client.open(uri, "x = 1\n" * (20 * 1024 * 1024 // 6))
    reply = client.complete(uri, 0, 1)
    growth_kib = rss_kib(server.pid) - before
    print(f"RSS growth after a 20 MB message over the limit: {growth_kib} KiB")
    assert reply["error"]["code"] == -32602 and "unknown document" in reply["error"]["message"], reply
    assert growth_kib < 8 * 1024, growth_kib
    wait_until(lambda: any("dropped unread" in n["params"]["message"] for n in client.notifications
                           if n.get("method") == "window/showMessage"), 10)
    assert client.status()["documents"] == 0
    client.close()


def test_document_over_the_size_limit_is_refused_when_it_arrives(server, tmp_path):
    """4.2M characters (message under 16 MB, document over 4M): refused at didOpen, not at completion."""
    client = connect(server.port, tmp_path)
    uri = (tmp_path / "big.py").as_uri()
    client.open(uri, "y = 2\n" * 700_000)
    assert client.status()["documents"] == 0
    reply = client.complete(uri, 0, 1)
    assert reply["error"]["code"] == -32602 and "unknown document" in reply["error"]["message"], reply
    client.close()


def test_idle_and_pre_initialize_timeouts(model_dir, tmp_path):
    """A silent connection is closed after the pre-initialize timeout (10 s), an initialized session
    after --idle-timeout without a message (before: both stayed open forever). No model is loaded."""
    port = free_port()
    proc = start(model_dir, port, "--idle-timeout", "2")
    try:
        idle = SyncClient.over_tcp("127.0.0.1", port)  # waits until the server listens
        silent = socket.create_connection(("127.0.0.1", port), timeout=120)
        assert "result" in idle.request("initialize", {"processId": None, "rootUri": tmp_path.as_uri(),
                                                       "capabilities": {}, "initializationOptions": OPTIONS}, 120)
        t0 = time.monotonic()
        wait_until(lambda: idle.eof, 30)
        assert time.monotonic() - t0 < 15
        silent.settimeout(30)
        assert silent.recv(1) == b""
        silent.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_client_that_never_reads_its_replies_is_closed_at_the_bound():
    """A session's replies go through BoundedWriter: a peer that never reads (here over a real socket
    whose other end only sends) is disconnected once its unread replies pass the bound, instead of the
    server buffering them without end (before: 10 MB of replies all buffered)."""
    import asyncio

    from longllama_lsp.tcp import BoundedWriter

    bound, reply = 256 << 10, b"x" * 1000

    async def flood() -> tuple[int, bool]:
        ours, theirs = socket.socketpair()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _, writer = await asyncio.open_connection(sock=ours)
        bounded = BoundedWriter(writer, bound, session_id=1)
        sent = 0
        while sent < 10_000 and not writer.transport.is_closing():  # 10 MB of replies, none read
            bounded.write(reply)
            sent += 1
            await asyncio.sleep(0)  # the loop hands the kernel what it takes
        closed = writer.transport.is_closing()
        theirs.close()
        return sent, closed

    sent, closed = asyncio.run(flood())
    print(f"closed after {sent} KB of unread replies (bound {bound >> 10} KB + the kernel's buffers)")
    assert closed and sent * len(reply) < bound + (4 << 20)
