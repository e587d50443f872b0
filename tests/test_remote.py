"""`longllama complete` and `ask` through a running `longllama serve --tcp` (issue 19; remote.py).

Test Data: the seeded tiny LongLLaMA + SmolLM2 tokenizer (tests/helpers_models.py); a two-file
repository in tmp_path; one `--tcp --port 0` server with the fake indexer (tests/helpers_indexer.py),
its record in a private XDG_RUNTIME_DIR, token from $LONGLLAMA_TOKEN; an editor session keeps the
repository open. The CLI runs as a separate process with the same runtime folder (so it finds the
record) and no token of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers_lsp import SyncClient, server_command, server_env, wait_until
from helpers_models import smol_tokenizer_dir, write_tiny_model  # noqa: F401

TOKEN = "remote-test-token"
SOURCE = 'import os\n\n\ndef greet(name):\n    """Say hello."""\n    print("hello", name)\n\n\ndef main():\n    gre'


@pytest.fixture(scope="module")
def served(smol_tokenizer_dir, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("remote")
    model_dir = write_tiny_model(base / "model", smol_tokenizer_dir, max_position_embeddings=1024)
    repo, runtime = base / "repo", base / "run"
    repo.mkdir()
    runtime.mkdir(mode=0o700)
    (repo / "main.py").write_text(SOURCE)
    (repo / "util.py").write_text("def helper(x):\n    return x + 1\n")
    env = server_env(XDG_RUNTIME_DIR=str(runtime), LONGLLAMA_TOKEN=TOKEN)
    proc = subprocess.Popen(server_command(model_dir, "--tcp", "--port", "0", "--indexer-factory",
                                           "helpers_indexer:make"), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record_file = wait_until(lambda: next(iter((runtime / "longllama").glob("server-lsp-*.json")), None), 120)
    port = json.loads(record_file.read_text())["port"]
    editor = SyncClient.over_tcp("127.0.0.1", port)
    assert "result" in editor.initialize(repo, {"token": TOKEN}, timeout=180)
    wait_until(lambda: str(repo.resolve()) in json.loads(record_file.read_text())["roots"], 180)
    cli_env = {k: v for k, v in env.items() if k != "LONGLLAMA_TOKEN"}  # the CLI reads the record
    yield {"proc": proc, "repo": repo, "model": model_dir, "env": cli_env, "port": port}
    editor.close()
    proc.kill()
    proc.wait()


def longllama(served, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longllama_lsp.cli", *args], env=served["env"], cwd=served["repo"],
                          capture_output=True, text=True, timeout=600)


def test_servers_lists_the_running_server(served):
    out = longllama(served, "servers", "--json")
    assert out.returncode == 0, out.stderr
    (record,) = json.loads(out.stdout)
    assert record["port"] == served["port"] and record["token"] == TOKEN
    assert record["roots"] == [str(served["repo"].resolve())]


def test_complete_runs_through_the_running_server(served):
    """No --model: the record has this repository open, so the server answers (the JSON names it)."""
    out = longllama(served, "complete", "--repo", str(served["repo"]), "main.py:10:8", "--max-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert done["server"] == f"127.0.0.1:{served['port']}" and isinstance(done["text"], str)


def test_ask_runs_through_the_running_server(served):
    out = longllama(served, "-v", "ask", "--repo", str(served["repo"]), "what does helper do?", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert "using the running server" in out.stderr and out.stdout.strip()
    assert "[the answer stopped at its limit of 4 tokens" in out.stderr  # the server's stopReason, read


def test_complete_loads_the_model_for_a_repository_no_server_has_open(served, tmp_path):
    """--model and a repository no server has open: the model is loaded here, as before (no "server" key)."""
    (tmp_path / "main.py").write_text(SOURCE)
    out = longllama(served, "complete", "--repo", str(tmp_path), "--no-memory", "--model", str(served["model"]),
                    str(tmp_path / "main.py") + ":10:8", "--max-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert "server" not in json.loads(out.stdout) and "timings" in json.loads(out.stdout)


@pytest.mark.parametrize("option", [["--retrieve-tokens", "0"], ["--select-tokens", "0"]])
def test_complete_with_memory_options_of_its_own_loads_the_model_here(served, option):
    """The server's engine options are its editors' settings: a completion asking for other ones is run
    here (no "server" key) rather than answered by the server with options it did not ask for."""
    env = {**served["env"], "LONGLLAMA_MODEL": str(served["model"])}  # no --model: the server is eligible
    out = subprocess.run([sys.executable, "-m", "longllama_lsp.cli", "-v", "complete", "--repo", str(served["repo"]),
                          "main.py:10:8", "--max-tokens", "4", "--json", *option], env=env, cwd=served["repo"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "server" not in json.loads(out.stdout) and "loading the model here" in out.stderr


@pytest.mark.parametrize("header", [b"Content-Length: -1", b"Content-Length: 99999999999", b"X" * 10_000])
def test_a_bad_frame_from_the_port_is_unreachable_not_a_crash(header):
    """The CLI reads frames from whatever listens on a record's port (framing.read_frame): a negative or
    huge Content-Length, or an endless header line, ends the connection before a body is read."""
    import socket
    import threading
    import time

    from longllama_lsp import remote
    from longllama_lsp.auth import ServerRecord

    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(header + b"\r\n\r\n" + b"{}" * 10)
            time.sleep(3)  # the connection stays open: the client must not wait for more

    threading.Thread(target=answer, daemon=True).start()
    record = ServerRecord(pid=0, host="127.0.0.1", port=listener.getsockname()[1], token="t")
    start = time.monotonic()
    with pytest.raises(remote.Unreachable, match="no answer from the server"):
        remote.LspConnection(record, timeout=10).request("initialize", {})
    assert time.monotonic() - start < 2
    listener.close()
