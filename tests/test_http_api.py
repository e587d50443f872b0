"""The OpenAI-compatible API (`longllama serve --http`), driven by the official `openai` client.

Test Data: a seeded tiny LongLLaMA (1024-token window) + the SmolLM2 tokenizer (helpers_models.py);
a two-file repository in tmp_path indexed by the fake indexer (helpers_indexer.py, real memory
bank, encoded on the engine's worker). The module's server is the real command in a subprocess,
started without a token so it makes one and publishes it in a server record (XDG_RUNTIME_DIR in
tmp_path), as a user's own tools would find it. Malformed requests use raw http.client / sockets.
One test runs the server in this process to see the engine cancel a request whose client left.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers_lsp import server_env, wait_until
from helpers_models import smol_tokenizer_dir, write_tiny_model  # noqa: F401

from longllama_lsp.http_api import (
    MAX_BODY_BYTES,
    ApiError,
    StopScan,
    cut_at_stop,
    parse_chat,
    parse_completion,
)

openai = pytest.importorskip("openai")

REPO_FILES = {"alpha.py": "def alpha():\n    return 1\n", "pkg/beta.py": "def beta(x):\n    return x * 2\n"}
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\n\nprint(add(1, 2))\nprint(add(3, 4))\n"


# -- unit: request parsing and stop sequences --------------------------------------------------------------

def test_stop_sequences_hold_back_what_may_begin_one():
    scan = StopScan(["\n\n", "END"])
    assert scan.feed("ab\n") == "ab" and scan.feed("c") == "\nc"  # "\n" could have begun "\n\n"
    assert scan.feed("EN") == "" and scan.feed("Dx") == "" and scan.stopped and scan.text == "ab\ncEN"[:-2]
    assert cut_at_stop("one\n\ntwo", ["\n\n"]) == ("one", True) and cut_at_stop("one", []) == ("one", False)


@pytest.mark.parametrize("body, param", [
    ([], None), ({"prompt": 3}, "prompt"), ({}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "stream": "yes"}, "stream"), ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stop": ["a"] * 5}, "stop"), ({"prompt": "x", "suffix": 1}, "suffix"),
    ({"prompt": "x", "mode": "page"}, "mode"), ({"prompt": "x", "echo": True}, "echo"),
])
def test_completion_bodies_are_typed(body, param):
    with pytest.raises(ApiError) as err:
        parse_completion(body)
    assert err.value.status == 400 and err.value.param == param


def test_chat_bodies_are_typed():
    ok = parse_chat({"messages": [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                     "max_completion_tokens": 5, "stop": "\n", "stream": True, "stream_options": {"include_usage": True}})
    assert ok.question == "hi" and ok.max_tokens == 5 and ok.stop == ["\n"] and ok.include_usage
    for bad in ({"messages": []}, {"messages": "hi"}, {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": [{"role": "assistant", "content": "only me"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                {"messages": [{"role": "user", "content": 5}]},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": " "}]}):
        with pytest.raises(ApiError) as err:
            parse_chat(bad)
        assert err.value.status == 400


# -- the real server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(smol_tokenizer_dir, tmp_path_factory) -> Path:  # noqa: F811
    return write_tiny_model(tmp_path_factory.mktemp("tiny-1k"), smol_tokenizer_dir, max_position_embeddings=1024)


class Server:
    """`longllama serve --http` in a subprocess; its stderr is collected on a thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "longllama_lsp.cli", "serve", "--http", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        self.port = int(self.wait_for("OpenAI-compatible API on").split("127.0.0.1:")[1].split("/")[0])

    def wait_for(self, text: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if text in line]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the reader thread's last lines
                raise AssertionError(f"the server exited ({self.proc.returncode}): {''.join(self.lines)}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed: {''.join(self.lines)}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    repo, run = tmp_path_factory.mktemp("repo"), tmp_path_factory.mktemp("run")
    for name, body in REPO_FILES.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(body)
    env = server_env(XDG_RUNTIME_DIR=str(run))
    env.pop("LONGLLAMA_TOKEN", None)  # the module's server makes its own
    s = Server(["--port", "0", "--model", str(model_dir), "--repo", str(repo), "--indexer-factory",
                "helpers_indexer:make"], env)
    s.run_dir, s.repo = run / "longllama", repo
    records = list(s.run_dir.glob("server-http-*.json"))
    s.record = json.loads(records[0].read_text()) if len(records) == 1 else None
    s.token = s.record["token"] if s.record else None
    yield s
    s.stop()
    assert s.proc.stdout.read() == ""  # nothing on stdout
    assert not list(s.run_dir.glob("server-http-*.json"))  # the record is removed on SIGTERM


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=server.token, max_retries=0,
                         timeout=120)


def indexed(client) -> None:
    """Wait until the repository is in memory (the fake indexer runs in the background)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = client.completions.create(model="tiny", prompt="x = ", max_tokens=1)
        if done.usage.model_extra.get("memory_tokens", 0) >= 10:
            return
        time.sleep(0.2)
    raise AssertionError("the repository never reached memory")


@pytest.mark.e2e
def test_a_generated_token_is_published_privately_not_printed(server):
    assert server.record is not None, "no server record published"
    assert server.record["protocol"] == "http" and server.record["port"] == server.port
    assert server.record["roots"] == [str(server.repo.resolve())]
    path = next(server.run_dir.glob("server-http-*.json"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert not any(server.token in line for line in server.lines)  # --print-token was not given
    assert any(str(path) in line for line in server.lines)  # where to find it is said


@pytest.mark.e2e
def test_models_and_a_completion_with_suffix(client):
    assert [m.id for m in client.models.list().data] == [client.models.list().data[0].id]
    indexed(client)
    with_suffix = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=6)
    without = client.completions.create(model="tiny", prompt=PREFIX, max_tokens=6)
    for done in (with_suffix, without):
        assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
        assert isinstance(done.choices[0].text, str) and done.usage.model_extra["memory_tokens"] > 0
    # The suffix reaches the engine: in the prompt (FIM) or in memory (the rest of the buffer).
    seen = [d.usage.prompt_tokens + d.usage.model_extra["memory_tokens"] for d in (with_suffix, without)]
    assert seen[0] > seen[1]
    streamed = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=6, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == with_suffix.choices[0].text
    assert chunks[-1].choices[0].finish_reason == with_suffix.choices[0].finish_reason


@pytest.mark.e2e
def test_a_prompt_wrapped_in_fim_markers_by_the_client_is_split_back(client):
    """Continue's FIM templates and llm.nvim (fim.enabled) wrap prefix and suffix themselves, in the
    markers of the model they think is served: the engine gets the text around the cursor as with
    prompt + suffix (and builds its own prompt: SmolLM2 has no FIM tokens), not the markers as text."""
    from test_fim import CLIENT_TEMPLATES, client_prompt

    indexed(client)
    plain = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=6)
    for template in CLIENT_TEMPLATES:
        wrapped = client.completions.create(model="tiny", prompt=client_prompt(template, PREFIX, SUFFIX),
                                            max_tokens=6)
        assert wrapped.choices[0].text == plain.choices[0].text, template
        assert wrapped.usage.prompt_tokens == plain.usage.prompt_tokens, template
    # With a suffix the client wrapped nothing: markers in the prompt are text of the buffer.
    literal = client.completions.create(model="tiny", prompt=client_prompt("starcoder", PREFIX, ""), suffix=SUFFIX,
                                        max_tokens=6)
    assert literal.usage.prompt_tokens > plain.usage.prompt_tokens


@pytest.mark.e2e
def test_chat_non_streamed_and_streamed(client):
    indexed(client)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does alpha return?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens >= 1 and whole.usage.model_extra["memory_tokens"] > 0
    assert whole.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole.choices[0].message.content  # greedy: the same answer, in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.e2e
def test_a_wrong_or_missing_token_is_refused(server, client):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    status, headers, body = raw(server.port, "GET", "/v1/models", token=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and body["error"]["type"] == "authentication_error"
    assert raw(server.port, "GET", "/v1/models", token=server.token[:-1])[0] == 401
    assert client.models.list().data  # still serving


def raw(port: int, method: str, path: str, body: bytes | None = None, token: str | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.headers), json.loads(data) if data else {}


@pytest.mark.e2e
def test_malformed_bodies_get_4xx_and_the_server_stays_up(server, client):
    t = server.token
    cases = [
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", b"\xff\xfe", 400),
        ("POST", "/v1/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", b'{"prompt": 42}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400),
        ("POST", "/v1/chat/completions", b'{"messages": "hello"}', 400),
        ("POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400),
        ("GET", "/v1/completions", None, 405),
        ("POST", "/v1/embeddings", b"{}", 404),
        ("GET", "/../../etc/passwd", None, 404),
    ]
    for method, path, body, status in cases:
        got, _, reply = raw(server.port, method, path, body, token=t)
        assert got == status, (path, body[:40] if body else None, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    # No Content-Length (a chunked body) is refused, not read.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "x"}']),
                 headers={"Authorization": f"Bearer {t}", "Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 411
    conn.close()
    assert client.completions.create(model="tiny", prompt="x = ", max_tokens=1).choices  # still serving
    assert server.proc.poll() is None


@pytest.mark.e2e
def test_one_connection_carries_a_stream_then_an_error(server):
    """Keep-alive: the handler that streamed the first answer replies to the next request afresh."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    auth = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x = ", "max_tokens": 1, "stream": True}),
                 headers=auth)
    first = conn.getresponse()
    assert first.headers["Content-Type"] == "text/event-stream" and first.read().endswith(b"data: [DONE]\n\n")
    conn.request("POST", "/v1/completions", body=b"{", headers=auth)
    second = conn.getresponse()
    assert second.status == 400 and json.loads(second.read())["error"]["type"] == "invalid_request_error"
    conn.close()


@pytest.mark.e2e
def test_an_oversize_body_is_refused_before_it_is_read(server, client):
    """Only the headers are sent: an answer proves the server did not wait for the body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            reply += part
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert client.models.list().data  # still serving


@pytest.mark.timeout(60)
def test_the_token_never_comes_from_argv(capsys):
    from longllama_lsp.cli import main

    assert main(["serve", "--http", "--token", "s3cret", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "LONGLLAMA_TOKEN" in err and "--token-file" in err and "s3cret" not in err


@pytest.mark.timeout(60)
def test_a_bad_token_file_or_repo_is_a_clear_error_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from longllama_lsp.server import main

    monkeypatch.delenv("LONGLLAMA_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    token_file.chmod(0o644)
    assert main(["--http", "--token-file", str(token_file), "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "chmod 600" in err and "Traceback" not in err and "s3cret" not in err
    token_file.chmod(0o600)
    assert main(["--http", "--token-file", str(token_file), "--repo", str(tmp_path / "gone"),
                 "--model", "/nonexistent"]) == 2
    assert f"--repo {tmp_path / 'gone'}: no such directory" in capsys.readouterr().err
    assert main(["--http", "--token-file", str(token_file), "--repo", str(tmp_path / "gone\x1b]0;owned\x07"),
                 "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "gone\\x1b]0;owned\\x07: no such directory" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, refused", [(["--tcp", "--repo", "{repo}"], "--repo is for --http"),
                                           (["--repo", "."], "--repo is for --http"),
                                           (["--tcp", "--print-token"], "--print-token is for --http")])
def test_http_options_given_to_a_language_server_are_refused_not_ignored(argv, refused, tmp_path, capsys):
    """`longllama serve --tcp --repo DIR` used to start and never open DIR (a TCP server indexes what its
    editors open): the user then waited on a server that `longllama ask` skipped."""
    from longllama_lsp.server import main

    assert main([a.format(repo=tmp_path) for a in argv] + ["--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert refused in err and "Traceback" not in err


# -- in process: what the engine does with requests whose client left or moved on -------------------------

@pytest.fixture(scope="module")
def local(model_dir):
    """The API server on a thread of this process, over its own engine (no repository)."""
    from longllama_lsp.engine import Engine, EngineOptions
    from longllama_lsp.http_api import Api, ApiServer
    from longllama_lsp.workspace import Workspace

    # No repetition guard: the seeded random model loops at once, and a stream holds a loop back (its
    # tests need text to arrive while the answer runs).
    engine = Engine.load(str(model_dir), "cpu", "float32",
                         options=EngineOptions(answer_max_tokens=400, answer_repetition=None))
    workspace = Workspace(engine, None)
    engine.wait_ready()
    server = ApiServer(("127.0.0.1", 0), Api(workspace, "t0ken", "tiny"))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.engine = engine
    yield server
    server.shutdown()
    server.server_close()
    workspace.close()


def counts(engine) -> dict[str, int]:
    return dict(engine.status()["requests"])


@pytest.mark.e2e
def test_a_client_that_disconnects_mid_stream_cancels_its_request(local):
    before = counts(local.engine)
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me everything."}], "stream": True,
                       "max_tokens": 400}).encode()
    with socket.create_connection(local.server_address, timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = b""
        while seen.count(b"data: ") < 3:  # the role, then generated text
            seen += s.recv(4096)
    wait_until(lambda: counts(local.engine)["cancelled"] > before["cancelled"])
    assert counts(local.engine)["completed"] == before["completed"]


@pytest.mark.e2e
def test_a_newer_request_of_the_same_user_supersedes_a_queued_one(local):
    """`user` keys requests: the older one, still queued, is answered empty (200), not an error."""
    engine = local.engine
    # The blocker holds the worker until released: a long answer could finish before the first request's
    # reply arrives on a loaded machine (red once in a fresh-clone CI), and then nothing proved the first
    # was superseded while still queued.
    running, release = threading.Event(), threading.Event()
    blocker = engine.submit(lambda _req: running.set() or release.wait(60))
    assert running.wait(30)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{local.server_address[1]}/v1", api_key="t0ken", max_retries=0)
    replies: dict[str, object] = {}

    def ask(name: str, tokens: int) -> None:
        replies[name] = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=tokens, user="editor-1")
    first, second = (threading.Thread(target=ask, args=args) for args in (("first", 300), ("second", 2)))
    first.start()
    wait_until(lambda: engine.pending >= 1, every=0.02)
    second.start()  # queued behind the blocker too: it supersedes the first at once
    first.join(60)
    assert "first" in replies and blocker.future.running()  # answered while still queued
    release.set()
    second.join(60)
    assert replies["first"].choices[0].message.content == "" and replies["first"].choices[0].finish_reason == "stop"
    assert replies["second"].usage.completion_tokens >= 1


# -- connections that never authenticate (other local users are hostile) ------------------------------------

def slow_clients(address, n: int) -> list[socket.socket]:
    """n connections that began a request and went quiet (a slowloris sends one byte a minute)."""
    socks = [socket.create_connection(address, timeout=10) for _ in range(n)]
    for s in socks:
        s.sendall(b"GET /v1/mo")
    return socks


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.e2e
def test_slow_unauthenticated_connections_do_not_lock_out_a_client(local):
    from longllama_lsp.http_api import MAX_CONNECTIONS

    socks = slow_clients(local.server_address, MAX_CONNECTIONS + 4)
    try:
        time.sleep(0.5)  # all of them accepted and waiting
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{local.server_address[1]}/v1", api_key="t0ken",
                               max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert closed_by_server(socks[0])  # the oldest waiting connection made room
    finally:
        for s in socks:
            s.close()


@pytest.mark.e2e
def test_a_connection_that_does_not_authenticate_in_time_is_closed(local):
    from longllama_lsp.http_api import ApiServer, HttpLimits

    server = ApiServer(("127.0.0.1", 0), local.api, HttpLimits(pre_auth_s=1.0))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        (s,) = slow_clients(server.server_address, 1)
        start = time.monotonic()
        for byte in b"dels HTTP/1.1\r\n":  # a byte every 0.2 s: no single read ever times out
            time.sleep(0.2)
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
        assert closed_by_server(s) and time.monotonic() - start < 5
        s.close()
    finally:
        server.shutdown()
        server.server_close()
