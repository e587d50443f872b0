"""Security (issue #9): listen address, workspace confinement, secrets out of the index and the logs,
no repository code run.

Test Data: the seeded tiny LongLLaMA + SmolLM2 tokenizer (tests/helpers_models.py); a small repository
written to tmp_path with planted fake credentials (an AWS access key id in code and in `.env`, a PEM
private key), a `conftest.py` and `setup.py` that would write a marker file if imported, and symlinks
to a folder outside the workspace. The real indexer (indexer.pipeline) indexes it through the server.
The fake keys below are made up (AWS's documented example format), never valid.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - the child running as nobody cannot read the stdlib to import it
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
from helpers_lsp import SyncClient, server_command, server_env, wait_until
from helpers_models import smol_tokenizer_dir, write_tiny_model  # noqa: F401

from longllama_lsp.framing import frame

AWS_KEY = "AKIAQWERTYUIOPASDFGH"
ENV_SECRET = "hunter2-Zx9Qv7Lm3Np8Rt"
PEM_BODY = "MIIEowIBAAKCAQEA7fAkEkEyFoRtHeSeCuRiTyTeStZ9"
OUTSIDE_MARKER = "OUTSIDE_THE_WORKSPACE_5f3a9c"
SECRETS = [AWS_KEY, ENV_SECRET, PEM_BODY, OUTSIDE_MARKER]

MARKER_CODE = "import pathlib\npathlib.Path({path!r}).write_text('imported')\n"


@pytest.fixture(scope="module")
def model_dir(smol_tokenizer_dir, tmp_path_factory) -> Path:  # noqa: F811
    return write_tiny_model(tmp_path_factory.mktemp("tiny-sec"), smol_tokenizer_dir)


def plant_repo(base: Path) -> tuple[Path, Path, Path]:
    root, outside, markers = base / "repo", base / "outside", base / "markers"
    for d in (root / "pkg", outside, markers):
        d.mkdir(parents=True)
    (root / "app.py").write_text("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n")
    (root / "pkg" / "config.py").write_text(f'REGION = "eu-west-1"\nAWS_ACCESS_KEY_ID = "{AWS_KEY}"\n')
    (root / ".env").write_text(f"DB_PASSWORD={ENV_SECRET}\n")
    (root / "deploy.key").write_text(f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----\n")
    (root / "notes.md").write_text(f"# Notes\n\n-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----\n")
    (root / "conftest.py").write_text(MARKER_CODE.format(path=str(markers / "conftest-ran")))
    (root / "setup.py").write_text(MARKER_CODE.format(path=str(markers / "setup-ran")))
    (outside / "stolen.py").write_text(f'TOKEN = "{OUTSIDE_MARKER}"\n')
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "leak.py").symlink_to(outside / "stolen.py")
    return root, outside, markers


@pytest.fixture(scope="module")
def indexed(model_dir, tmp_path_factory):
    """The server with the real indexer on the planted repository, indexing done (state 'watching')."""
    base = tmp_path_factory.mktemp("sec")
    root, outside, markers = plant_repo(base)
    log = base / "server.log"
    proc = subprocess.Popen(server_command(model_dir, "--verbose", "--log-file", str(log)), env=server_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=base)
    client = SyncClient.over_process(proc)
    client.proc, client.root, client.outside, client.markers, client.log = proc, root, outside, markers, log
    assert "result" in client.initialize(root, {"completion": {"maxTokens": 4, "debounceMs": 0},
                                                "ask": {"maxTokens": 4}, "logLevel": "debug"})
    client.final = wait_until(lambda: (s := client.status())["indexing"] in ("watching", "error") and s, 180, 0.2)
    yield client
    proc.kill()
    proc.wait()


# -- listen address ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needs", [(["--host", "0.0.0.0"], "--allow-remote"),
                                          (["--host", "::"], "--allow-remote"),
                                          (["--token", "s3cret"], "--token is gone"),
                                          (["--host", "192.168.1.10", "--allow-remote", "--token", "x"], "(ps)")])
def test_non_loopback_tcp_or_a_token_on_argv_is_refused(tmp_path, capsys, extra, needs):
    """The command line refuses before loading anything or opening a socket (exit status 2): a token
    on the command line is readable by every local user (/proc/PID/cmdline, ps)."""
    from longllama_lsp.server import main

    assert main(["--tcp", "--port", "1", *extra, "--model", str(tmp_path / "never-loaded")]) == 2
    out = capsys.readouterr()
    assert needs in out.err and out.out == ""


def test_tcp_host_defaults_to_loopback():
    import argparse

    from longllama_lsp.server import add_arguments, check_listen_address

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--tcp"])
    assert args.host == "127.0.0.1" and check_listen_address(args) is None


def test_log_lines_are_redacted():
    import logging

    from longllama_lsp.server import RedactingFormatter

    try:
        raise ValueError(f"bad value {AWS_KEY}")
    except ValueError:
        import sys as _sys
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "got %s", (AWS_KEY,), _sys.exc_info())
    line = RedactingFormatter("%(message)s").format(record)
    assert AWS_KEY not in line and "[REDACTED]" in line and "ValueError" in line


def test_server_log_lines_and_errors_show_control_characters_escaped(capsys):
    """A repository's file names reach the server's log lines, and its stderr is often a terminal: an
    ESC sequence in a name (an OSC 52 clipboard write) arrives as text, newlines between lines kept."""
    import argparse
    import logging

    from longllama_lsp.server import RedactingFormatter, add_arguments, run

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "skipped %s\nnext", ("a\x1b]52;c;eA==\x07.py",), None)
    line = RedactingFormatter("%(message)s").format(record)
    assert line == "skipped a\\x1b]52;c;eA==\\x07.py\nnext"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--tcp", "--host", "\x1b]0;owned\x07"])) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b]0;owned" in err


def listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # LISTEN
                found.add(address)
    return found


@pytest.mark.slow
def test_tcp_listens_on_loopback_by_default(tmp_path):
    """The real process: its listening socket is 127.0.0.1 only (read from /proc/net/tcp)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "longllama_lsp.server", "--tcp", "--port", str(port), "--no-index",
                             "--model", str(tmp_path / "never-loaded")], env=server_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        addresses = wait_until(lambda: listening_addresses(port), 120)
        assert addresses == {"0100007F"}, addresses  # 127.0.0.1 only, little-endian hex
    finally:
        proc.kill()
        proc.wait()


# -- indexing: secrets, symlinks, no code executed ----------------------------------------------------------

def stored(root: Path):
    """(file rows by path, chunk content hashes by path) of the index the server wrote."""
    from indexer.store import Store

    [db] = (root / ".longllama").glob("index-*.db")
    with Store.open(db, None, readonly=True) as store:
        files = {f.path: f for f in store.files()}
        chunks: dict[str, set[str]] = {}
        for c in store.chunks():
            chunks.setdefault(c.path, set()).add(c.content_hash)
    return files, chunks


def chunk_hashes(path: Path) -> set[str]:
    """The content hashes the chunker gives `path`'s text (what the index would hold if it took it)."""
    from indexer.chunker import chunk_file

    return {c.content_hash for c in chunk_file(path.name, path.read_bytes(), lambda t: len(t) // 4, 256).chunks}


def test_secret_files_have_no_chunks_and_say_which_rule(indexed):
    """The database stores hashes and tensors, never text, so grepping it for a secret proves nothing.
    What can fail: each secret-bearing file is a 'skipped' row whose reason names the rule, it has no
    chunk rows, and none of its chunks' content hashes (computed here) is anywhere in the index."""
    assert indexed.final["indexing"] == "watching", indexed.final
    files, chunks = stored(indexed.root)
    assert files["app.py"].status == "indexed" and chunks["app.py"] == chunk_hashes(indexed.root / "app.py")
    every_hash = set().union(*chunks.values())
    for rel, rule in [("pkg/config.py", "secret: AWS Access Key (detect-secrets AWSKeyDetector) on line 2"),
                      ("notes.md", "secret: Private Key (detect-secrets PrivateKeyDetector) on line 3"),
                      (".env", "secret: environment file (.env)"),
                      ("deploy.key", "secret: private key file (.key)")]:
        assert files[rel].status == "skipped" and files[rel].skip_reason.startswith(rule), files[rel]
        assert rel not in chunks
        assert not chunk_hashes(indexed.root / rel) & every_hash, rel
    assert indexed.final["files"] == sum(f.status == "indexed" for f in files.values())


def test_explain_names_the_secret_rule(indexed, capsys):
    from longllama_lsp.cli import main

    assert main(["index", "--repo", str(indexed.root), "--explain", "pkg/config.py"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pkg/config.py: not indexed (secret: AWS Access Key (detect-secrets AWSKeyDetector)")
    assert AWS_KEY not in out


def test_files_outside_the_workspace_are_not_in_the_index(indexed):
    """Symlinks out of the workspace (`escape/ -> ../outside`, `leak.py -> ../outside/stolen.py`) are
    skipped rows with the reason, and the outside file's chunk hashes are nowhere in the index."""
    files, chunks = stored(indexed.root)
    assert files["leak.py"].status == "skipped" and "symlink leaves the root" in files["leak.py"].skip_reason
    assert files["escape"].status == "skipped" and "symlink" in files["escape"].skip_reason
    assert not any(p.startswith("escape/") for p in files)
    assert not chunk_hashes(indexed.outside / "stolen.py") & set().union(*chunks.values())


def test_no_repository_code_is_imported_or_run(indexed):
    assert not list(indexed.markers.iterdir()), "indexing ran repository code"


def test_requests_for_files_outside_the_workspace_do_not_read_them(indexed):
    """The server only knows what the editor sent (didOpen): URIs outside the workspace, with ../ or
    through a symlink that leaves it are 'unknown document', never read from disk."""
    stolen = indexed.outside / "stolen.py"
    for uri in [stolen.as_uri(), (indexed.root / ".." / "outside" / "stolen.py").as_uri().replace("%2E", "."),
                f"{indexed.root.as_uri()}/../outside/stolen.py", (indexed.root / "leak.py").as_uri(),
                (indexed.root / "escape" / "stolen.py").as_uri(), "file:///etc/passwd"]:
        reply = indexed.complete(uri, 0, 0)
        assert reply["error"]["code"] == -32602 and "unknown document" in reply["error"]["message"], reply
        reply = indexed.request("longllama/ask", {"question": "what is TOKEN?", "textDocument": {"uri": uri}})
        assert reply["error"]["code"] == -32602, reply
    answer = indexed.request("longllama/ask", {"question": "What is TOKEN?"}, timeout=120)["result"]
    assert OUTSIDE_MARKER not in answer["answer"]
    assert all(not s["path"].startswith(("..", "/")) and "escape" not in s["path"] for s in answer["sources"])


def test_secrets_sent_by_the_editor_stay_out_of_the_log(indexed):
    """A buffer with a key, a broken message quoting it, a bad request carrying it: none in the log file."""
    uri = (indexed.root / "scratch.py").as_uri()
    indexed.open(uri, f'KEY = "{AWS_KEY}"\nx = 1\n')
    indexed.send({"id": 99, "method": "longllama/ask", "params": {"question": f"is {AWS_KEY} valid?"}})  # no jsonrpc
    indexed.request("longllama/ask", {"question": ["list", AWS_KEY], "textDocument": {"uri": uri}})
    indexed.request("longllama/ask", {"question": f"what is {ENV_SECRET}?", "textDocument": {"uri": uri}}, 120)
    indexed.notify("textDocument/didChange", {"textDocument": {"uri": uri}, "contentChanges": [{"bogus": AWS_KEY}]})
    assert "result" in indexed.complete(uri, 1, 5)
    indexed.status()
    time.sleep(0.5)  # let the log handler flush
    text = indexed.log.read_text(errors="replace")
    assert "model ready" in text  # the log is being written
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked into the log"
    # The editor's log (window/logMessage) is a log too.
    editor_log = json.dumps([n for n in indexed.notifications if n.get("method") == "window/logMessage"])
    assert "logMessage" in editor_log and "indexed" in editor_log  # messages do reach the editor
    for secret in SECRETS:
        assert secret not in editor_log, f"{secret} leaked into window/logMessage"


# -- a hostile repository through `longllama index` / `status` (issue 18) -----------------------------------
# Test Data: the seeded tiny LongLLaMA (tests/helpers_models.py) and two stdlib json modules.

def hostile_repo(root: Path) -> Path:
    import json as stdlib_json

    (root / "pkg").mkdir(parents=True)
    for name in ("scanner.py", "tool.py"):
        shutil.copy2(Path(stdlib_json.__file__).parent / name, root / "pkg" / name)
    return root


def index_cli(root: Path, model_dir: Path, *extra: str) -> int:
    from longllama_lsp.cli import main

    return main(["index", "--repo", str(root), "--model", str(model_dir), "-q", *extra])


def test_index_survives_undecodable_names_and_hostile_ignore_files(model_dir, tmp_path, capsys):
    """`bad_\\xff.py` crashed `longllama index` (UnicodeEncodeError), a `.gitignore` -> /dev/zero ran out
    of memory, a FIFO `.gitignore` hung: now each is one skipped file and the pass completes."""
    root = hostile_repo(tmp_path / "repo")
    with open(os.path.join(os.fsencode(root), b"bad_\xff.py"), "wb") as f:
        f.write(b"x = 1\n")
    (root / ".gitignore").symlink_to("/dev/zero")
    os.mkfifo(root / "pkg" / ".gitignore")
    assert index_cli(root, model_dir) == 0
    out = capsys.readouterr().out
    assert "2 files (2 changed, 0 deleted, 3 skipped)" in out, out
    from longllama_lsp.cli import main

    assert main(["status", "--repo", str(root)]) == 0
    assert "bad_\ufffd.py: file name is not valid UTF-8" in capsys.readouterr().out


def test_committed_lock_symlink_makes_index_fail_cleanly_and_write_nothing(model_dir, tmp_path, capsys):
    root = hostile_repo(tmp_path / "repo")
    assert index_cli(root, model_dir) == 0  # learn this model's database name
    [db] = (root / ".longllama").glob("index-*.db")
    shutil.rmtree(root / ".longllama")
    (root / ".longllama").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    Path(f"{db}.lock").symlink_to(victim)  # as `git clone` leaves it
    capsys.readouterr()
    assert index_cli(root, model_dir) == 1
    assert "is a symlink" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"


def test_a_cache_shipped_by_someone_else_is_encoded_again(model_dir, tmp_path, capsys, monkeypatch):
    """The repository ships `.longllama/` built under another user's key (a poisoned cache): the
    victim's index encodes every chunk itself; the owner's own second run encodes nothing."""
    root = hostile_repo(tmp_path / "repo")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "attacker"))
    assert index_cli(root, model_dir, "--json") == 0
    first = json.loads(capsys.readouterr().out)
    assert first["chunks_encoded"] > 0
    assert index_cli(root, model_dir, "--json") == 0
    assert json.loads(capsys.readouterr().out)["chunks_encoded"] == 0  # the owner reuses its own
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "victim"))
    assert index_cli(root, model_dir, "--json") == 0
    assert json.loads(capsys.readouterr().out)["chunks_encoded"] == first["chunks_encoded"]


def test_damaged_index_is_a_clear_error_and_rebuild_recovers(model_dir, tmp_path, capsys):
    """A damaged table page gave a raw sqlite3.DatabaseError traceback from `status` and `index`."""
    import sqlite3

    from longllama_lsp.cli import main

    root = hostile_repo(tmp_path / "repo")
    assert index_cli(root, model_dir) == 0
    [db] = (root / ".longllama").glob("index-*.db")
    con = sqlite3.connect(db)
    page, = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'chunks'").fetchone()
    size, = con.execute("PRAGMA page_size").fetchone()
    con.close()
    with open(db, "r+b") as f:
        f.seek((page - 1) * size + 8)
        f.write(b"\xff" * 64)
    capsys.readouterr()
    assert main(["status", "--repo", str(root)]) == 1  # said in the listing, as any unusable index file is
    out, err = capsys.readouterr()
    assert "  unusable: index" in out and "`longllama index --rebuild`" in out and "Traceback" not in out + err
    assert index_cli(root, model_dir) == 1
    assert "--rebuild" in capsys.readouterr().err
    assert index_cli(root, model_dir, "--rebuild", "--json") == 0
    assert json.loads(capsys.readouterr().out)["files_indexed"] == 2
    assert main(["status", "--repo", str(root)]) == 0


# -- TCP: other local users (issue 18) ---------------------------------------------------------------------
# Test Data: three folders in tmp_path: the first editor's repository (app/db.py, app/billing.py,
# deploy/jobs.py), a second editor's (notes.py), and a folder owned by `nobody`, mode 0700, with
# billing.py (charge_card). One `--tcp --port 0` server with the real indexer, run as this (root) user,
# no token given: it makes one and publishes it in a private server record (XDG_RUNTIME_DIR of its own).
# The hostile client runs as uid `nobody` (os.setuid in the child).

NOBODY = 65534
MINE = {"app/db.py": "def connect(url):\n    return url\n\n\ndef query(conn, sql):\n    return conn, sql\n",
        "app/billing.py": "def invoice(total):\n    return total * 1.2\n\n\ndef refund(total):\n    return -total\n",
        "deploy/jobs.py": "def nightly():\n    return 'backup'\n\n\ndef weekly():\n    return 'report'\n"}


def hostile_client(port: int, runtime: Path, root_uri: str) -> dict:
    """What a client of another uid gets: run in a forked child after setuid(nobody)."""
    out: dict = {"uid": os.getuid()}
    try:
        os.listdir(runtime)
        out["record_readable"] = True
    except OSError:
        out["record_readable"] = False
    for name, options in [("none", {}), ("guess", {"token": "s3cret"})]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(frame(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "processId": None, "rootUri": root_uri, "capabilities": {},
                "initializationOptions": options}}).encode()))
            s.sendall(frame(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "longllama/ask",
                                        "params": {"question": "?"}}).encode()))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        first = json.loads(rest[:int(head.split(b":")[1])]) if rest else {}
        out[name] = {"first": first, "messages": data.count(b"Content-Length:")}
    return out


def as_nobody(fn, *args) -> dict:
    """fn(*args) in a forked child running as uid/gid nobody; its JSON result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = fn(*args)
        except BaseException:  # noqa: BLE001 - the parent shows it
            result = {"child_error": traceback.format_exc()}
        finally:
            os.write(write, json.dumps(result).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "child_error" not in result, result["child_error"]
    return result


@pytest.fixture(scope="module")
def tcp(model_dir, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid (nobody)")
    base = tmp_path_factory.mktemp("tcp-sec")
    base.chmod(0o755)
    # $XDG_RUNTIME_DIR is a folder other users may enter here (pytest's tmp tree is 0700 for all): the
    # 0700 mode of the server's own records folder inside it is what keeps `nobody` out.
    open_parent = Path(tempfile.mkdtemp(prefix="longllama-tcp-"))
    open_parent.chmod(0o755)
    mine, theirs, foreign, runtime = base / "mine", base / "theirs", base / "foreign", open_parent / "run"
    for rel, text in MINE.items():
        (mine / rel).parent.mkdir(parents=True, exist_ok=True)
        (mine / rel).write_text(text)
    theirs.mkdir()
    (theirs / "notes.py").write_text("def note(text):\n    return text.strip()\n")
    foreign.mkdir()
    (foreign / "billing.py").write_text("def charge_card(number, amount):\n    return number, amount\n")
    os.chown(foreign / "billing.py", NOBODY, NOBODY)
    os.chown(foreign, NOBODY, NOBODY)
    foreign.chmod(0o700)
    runtime.mkdir(mode=0o755)
    log = base / "server.log"
    env = server_env(XDG_RUNTIME_DIR=str(runtime))
    env.pop("LONGLLAMA_TOKEN", None)
    proc = subprocess.Popen(server_command(model_dir, "--tcp", "--port", "0", "--log-file", str(log)), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runtime = runtime / "longllama"  # auth.runtime_dir()
    record_file = wait_until(lambda: next(iter(runtime.glob("server-lsp-*.json")), None), 120)
    record = json.loads(record_file.read_text())
    ns = type("Tcp", (), {})()
    ns.proc, ns.base, ns.mine, ns.theirs, ns.foreign, ns.runtime, ns.log = proc, base, mine, theirs, foreign, runtime, log
    ns.record_file, ns.record, ns.port, ns.token = record_file, record, record["port"], record["token"]
    options = {"completion": {"maxTokens": 4, "debounceMs": 0}, "ask": {"maxTokens": 4}, "token": ns.token}
    ns.options = options

    def editor(root: Path) -> SyncClient:
        client = SyncClient.over_tcp("127.0.0.1", ns.port)
        assert "result" in client.initialize(root, options, timeout=180)
        return client
    ns.editor = editor
    yield ns
    proc.kill()
    proc.wait()
    shutil.rmtree(open_parent, ignore_errors=True)


def test_tcp_token_is_private_and_never_on_the_command_line(tcp):
    """No token given: the server made one; it is in a 0600 record in a 0700 folder, not in argv, not logged."""
    assert tcp.record_file.stat().st_mode & 0o777 == 0o600
    assert tcp.runtime.stat().st_mode & 0o777 == 0o700
    assert len(tcp.token) >= 32
    assert tcp.token.encode() not in Path(f"/proc/{tcp.proc.pid}/cmdline").read_bytes()
    assert tcp.token not in tcp.log.read_text()
    assert tcp.record["pid"] == tcp.proc.pid and tcp.record["host"] == "127.0.0.1"


def test_tcp_client_without_the_token_as_another_uid_is_refused(tcp):
    """As uid nobody: no token and a guessed token both get -32001 and the connection ends; the
    question sent after initialize is never answered; the record's folder cannot be listed."""
    out = as_nobody(hostile_client, tcp.port, tcp.runtime, tcp.mine.as_uri())
    assert out["uid"] == NOBODY and out["record_readable"] is False
    for name in ("none", "guess"):
        assert out[name]["first"].get("error", {}).get("code") == -32001, out
        assert out[name]["messages"] == 1, out  # the question after initialize got nothing
    assert "refused a TCP client" in tcp.log.read_text()


def sources_of(reply: dict) -> set[str]:
    return {s["path"] for s in reply["result"]["sources"]}


def test_tcp_sessions_read_only_their_own_roots(tcp):
    """Two editors on one server, each with its own repository: the second one's answers and
    completions never name the first one's files (before: every session read every indexer)."""
    first, second = tcp.editor(tcp.mine), tcp.editor(tcp.theirs)
    for client in (first, second):
        wait_until(lambda c=client: c.status()["indexing"] in ("watching", "error"), 300, 0.3)
        assert client.status()["indexing"] == "watching"
    mine = sources_of(first.request("longllama/ask", {"question": "How is the invoice computed?"}, 180))
    assert mine and mine <= set(MINE), mine  # memory is there for the session that opened it
    theirs = sources_of(second.request("longllama/ask", {"question": "How is the invoice computed?"}, 180))
    assert theirs <= {"notes.py"}, theirs
    uri = (tcp.theirs / "scratch.py").as_uri()
    second.open(uri, "def total(x):\n    return x\n\n\ndef main():\n    tot")
    reply = second.request("textDocument/completion", {"textDocument": {"uri": uri},
                                                       "position": {"line": 5, "character": 7}}, 180)
    docs = json.dumps(reply["result"])
    assert not any(name in docs for name in MINE), docs
    for client in (first, second):
        client.close()


def test_tcp_folder_the_server_user_does_not_own_is_refused(tcp):
    """A client names a folder owned by another user (0700): not indexed, nothing written into it, the
    client is told why; its answers name none of that folder's files."""
    client = tcp.editor(tcp.foreign)
    wait_until(lambda: any("refused" in n["params"]["message"] for n in client.notifications
                           if n.get("method") == "window/showMessage"), 120)
    status = client.status()
    assert status["roots"] == [] and status["files"] == 0
    answer = client.request("longllama/ask", {"question": "Where is charge_card?"}, 180)["result"]
    assert not any("billing" in s["path"] for s in answer["sources"])
    assert sorted(p.name for p in tcp.foreign.iterdir()) == ["billing.py"]  # no .longllama/ inside
    assert str(tcp.foreign) not in json.loads(tcp.record_file.read_text())["roots"]
    client.close()


def test_tcp_record_lists_the_open_roots(tcp):
    """The record follows the roots the sessions have open (the CLI looks a repository up there)."""
    third = tcp.base / "third"
    third.mkdir()
    (third / "one.py").write_text("ONE = 1\n")
    client = tcp.editor(third)
    wait_until(lambda: str(third.resolve()) in json.loads(tcp.record_file.read_text())["roots"], 120)
    wait_until(lambda: client.status()["indexing"] == "watching", 120)
    client.request("shutdown")
    client.notify("exit", None)
    wait_until(lambda: str(third.resolve()) not in json.loads(tcp.record_file.read_text())["roots"], 60)


def test_root_refusal_allow_list(tmp_path):
    """The rule behind the refusal: the server user's own folders, or under an --allow-root folder."""
    from longllama_lsp.auth import root_refusal

    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    assert root_refusal(tmp_path) is None
    assert "does not exist" in root_refusal(tmp_path / "nope") or "No such file" in root_refusal(tmp_path / "nope")
    if os.geteuid() == 0:
        os.chown(theirs, NOBODY, NOBODY)
        assert "--allow-root" in root_refusal(theirs)
        assert root_refusal(theirs, [theirs.resolve()]) is None
        assert root_refusal(theirs / "sub", [theirs.resolve()]) is None


def test_documents_are_limited_as_text_arrives():
    """Per session: one document's size, their count and their sum, checked at didOpen/didChange."""
    from lsprotocol import types

    from longllama_lsp.documents import DocumentLimit, Documents

    def item(uri: str, text: str) -> types.TextDocumentItem:
        return types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
    docs = Documents(max_documents=2, max_chars=100, max_document_chars=60)
    docs.open(item("a", "x" * 50))
    with pytest.raises(DocumentLimit, match="limit 60"):
        docs.open(item("big", "x" * 61))
    with pytest.raises(DocumentLimit, match="per session"):
        docs.open(item("b", "x" * 51))
    docs.open(item("b", "x" * 50))
    with pytest.raises(DocumentLimit, match="documents are open"):
        docs.open(item("c", "x"))
    grow = types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri="b", version=2),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text="y" * 55)])
    with pytest.raises(DocumentLimit):
        docs.change(grow, "utf-16")
    assert "b" not in docs and docs.chars == 50  # an edit past a limit drops the document
    docs.close("a")
    assert docs.chars == 0 and len(docs) == 0


def test_the_cli_sends_nothing_to_another_users_listener_on_a_records_port():
    """kill -9 leaves a server's record; once its pid is reused (here: this process) and another user
    listens on its port, `longllama complete`/`ask` must not send the token or the file there."""
    from longllama_lsp import remote
    from longllama_lsp.auth import ServerRecord

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid (nobody)")
    ports, results = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child listens as nobody and reports what it received
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener = socket.create_server(("127.0.0.1", 0))
            os.write(ports[1], b"%d\n" % listener.getsockname()[1])
            listener.settimeout(5)
            try:
                conn, _ = listener.accept()
                conn.settimeout(2)
                received = conn.recv(65536)
            except OSError:
                received = b""
            os.write(results[1], received or b"-")
        finally:
            os._exit(0)
    os.close(ports[1])
    os.close(results[1])
    port = int(os.read(ports[0], 64))
    record = ServerRecord(pid=os.getpid(), host="127.0.0.1", port=port, token="the-users-token")
    with pytest.raises(remote.Unreachable, match="not this user's server"):
        remote.session(record, Path("/tmp"), {}, timeout=3, memory=False)
    received = b""
    while chunk := os.read(results[0], 65536):
        received += chunk
    os.waitpid(pid, 0)
    assert received == b"-", received  # nothing sent, the token least of all
