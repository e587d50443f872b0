"""Server tokens and server records (longllama_lsp.auth): private files only, never argv."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from longllama_lsp import auth


@pytest.fixture(autouse=True)
def private_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    (tmp_path / "run").mkdir(mode=0o700)


def test_token_from_env_then_file_then_fresh(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text("from-file\n")
    f.chmod(0o600)
    assert auth.server_token(f) == ("from-file", False)
    monkeypatch.setenv(auth.TOKEN_ENV, "from-env")
    assert auth.server_token(f) == ("from-env", False)
    monkeypatch.delenv(auth.TOKEN_ENV)
    (a, generated_a), (b, generated_b) = auth.server_token(), auth.server_token()
    assert a != b and len(a) >= 32 and generated_a and generated_b


def test_token_file_readable_by_others_is_refused(tmp_path):
    f = tmp_path / "token"
    f.write_text("secret")
    f.chmod(0o644)
    with pytest.raises(auth.AuthError, match="chmod 600"):
        auth.server_token(f)


def test_token_file_symlink_and_fifo_are_refused(tmp_path):
    target = tmp_path / "real"
    target.write_text("secret")
    target.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(auth.AuthError):
        auth.server_token(link)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(auth.AuthError, match="not a regular file"):
        auth.server_token(fifo)


def test_tokens_match():
    assert auth.tokens_match("abc", "abc")
    assert not auth.tokens_match("abd", "abc")
    assert not auth.tokens_match(None, "abc")
    assert not auth.tokens_match(["abc"], "abc")


def test_record_is_private_and_dead_servers_are_dropped():
    live = auth.ServerRecord(pid=os.getpid(), host="127.0.0.1", port=1234, token="t", roots=["/r"])
    path = auth.publish(live)
    assert path.stat().st_mode & 0o777 == 0o600
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()
    dead = auth.publish(auth.ServerRecord(pid=int(dead_pid), host="127.0.0.1", port=99, token="x"))
    assert auth.running_servers() == [live]
    assert not dead.exists()
    auth.unpublish(live)
    assert auth.running_servers() == []


def test_record_readable_by_others_is_ignored():
    record = auth.ServerRecord(pid=os.getpid(), host="127.0.0.1", port=1, token="t")
    auth.publish(record).chmod(0o644)
    assert auth.running_servers() == []


def test_finding_servers_without_xdg_runtime_dir_imports_no_torch(tmp_path):
    """`longllama complete`/`ask` through a server and `longllama servers` look for server records in
    <cache>/run when XDG_RUNTIME_DIR is unset: finding that directory must not load the model package."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["LONGLLAMA_CACHE"] = str(tmp_path / "cache")
    code = ("import sys; from pathlib import Path; from longllama_lsp import remote; "
            "assert remote.find_server(Path('.')) is None; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert (tmp_path / "cache" / "run").is_dir()
