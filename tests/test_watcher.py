"""indexer.watcher through the real Indexer: atomic saves, bursts, ignored paths, deletes.

Test Data: a copy of the stdlib `json` package, indexed with the seeded tiny LongLLaMA and the real
SmolLM2 tokenizer (tests/helpers_models.py); inotify events from real file operations.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers_models import smol_tokenizer_dir, tiny_model_dir  # noqa: F401

from indexer.pipeline import Indexer, IndexSummary
from indexer.watcher import Watcher

JSON_PKG = Path(json.__file__).parent
SETTLE_S = 2.0  # "within a couple of seconds"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):  # noqa: F811
    from longllama_lsp.model.loading import load_model, load_tokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats two fighting on a shared box
    yield load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir), tiny_model_dir
    torch.set_num_threads(before)


class Updates:
    """Collects the watcher's update summaries; `wait(pred)` blocks until one satisfies pred."""

    def __init__(self):
        self.summaries: list[IndexSummary] = []
        self.cond = threading.Condition()

    def __call__(self, summary: IndexSummary) -> None:
        with self.cond:
            self.summaries.append(summary)
            self.cond.notify_all()

    def wait(self, predicate, timeout: float) -> float:
        """Seconds until predicate() held (checked after each update); fails after `timeout`."""
        t0 = time.monotonic()
        with self.cond:
            while not predicate():
                left = timeout - (time.monotonic() - t0)
                assert left > 0, f"not within {timeout} s; updates: {[s.line() for s in self.summaries]}"
                self.cond.wait(left)
        return time.monotonic() - t0


@pytest.fixture
def watched(tiny, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(JSON_PKG, root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".gitignore").write_text("generated/\n*.log\n")
    model, tok, model_dir = tiny
    updates = Updates()
    with Indexer.open(root, model, tok, model_dir, chunk_tokens=96) as ix:
        ix.index()
        ix.start_watching(debounce=0.1, on_update=updates)
        yield root, ix, updates


def bank_paths(ix: Indexer) -> set[str]:
    with ix.lock:
        return {row.path for row in ix.bank.resident().values()}


def bank_hashes(ix: Indexer, path: str, field: str = "content_hash") -> set[str]:
    with ix.lock:
        return {getattr(row, field) for row in ix.bank.resident().values() if row.path == path}


def atomic_save(path: Path, text: str) -> None:
    """What editors do: write a temp file beside the target, then rename it over the target."""
    tmp = path.with_name(f".{path.name}.swp~")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_atomic_save_updates_the_bank_quickly(watched):
    root, ix, updates = watched
    target = root / "json/decoder.py"
    before, keys = bank_hashes(ix, "json/decoder.py"), bank_hashes(ix, "json/decoder.py", "memory_key")
    atomic_save(target, target.read_text().replace("def JSONObject(", "def JSONObject(  # edited\n        ", 1))
    took = updates.wait(lambda: bank_hashes(ix, "json/decoder.py") != before, SETTLE_S)
    after = bank_hashes(ix, "json/decoder.py")
    assert 1 <= len(after - before) <= 3 and len(before & after) >= len(before) - 3
    # encoded: the edited chunks, and those after them whose context (the text before them) holds the edit
    new_keys = bank_hashes(ix, "json/decoder.py", "memory_key") - keys
    assert sum(s.chunks_encoded for s in updates.summaries) == len(new_keys) <= len(after - before) + 8
    assert not any(p.endswith("~") for p in bank_paths(ix)), "the temp file must not be indexed"
    assert took < SETTLE_S


def test_burst_of_200_files_is_coalesced(watched):
    root, ix, updates = watched
    gen = root / "pkg"
    gen.mkdir()
    for i in range(200):
        (gen / f"mod_{i:03d}.py").write_text(f"def f_{i}(x):\n    return x * {i}\n")
    updates.wait(lambda: sum(p.startswith("pkg/") for p in bank_paths(ix)) == 200, 20)
    assert len(updates.summaries) <= 5, [s.line() for s in updates.summaries]
    assert ix._watcher.updates == len(updates.summaries)


def test_ignored_paths_are_not_indexed(watched):
    root, ix, updates = watched
    (root / "generated").mkdir()
    (root / "generated/out.py").write_text("x = 1\n")  # .gitignore: generated/
    (root / "build.log").write_text("log line\n")  # .gitignore: *.log
    (root / "node_modules/lib").mkdir(parents=True)
    (root / "node_modules/lib/index.js").write_text("module.exports = 1;\n")  # never walked
    (root / "json/__pycache__").mkdir(exist_ok=True)
    (root / "json/__pycache__/x.pyc").write_bytes(b"\0" * 16)
    (root / "json/new.py").write_text("def new():\n    return 1\n")  # a real file, after the others
    updates.wait(lambda: "json/new.py" in bank_paths(ix), SETTLE_S)
    time.sleep(0.3)  # let any later flush land
    stored = {f.path for f in ix.store.files() if f.status == "indexed"}
    for ignored in ("generated/out.py", "build.log", "node_modules/lib/index.js", "json/__pycache__/x.pyc"):
        assert ignored not in stored and ignored not in bank_paths(ix)
    assert sum(s.chunks_encoded for s in updates.summaries) == 1


def test_delete_and_move_through_the_watcher(watched):
    root, ix, updates = watched
    (root / "json/tool.py").unlink()
    updates.wait(lambda: "json/tool.py" not in bank_paths(ix), SETTLE_S)
    (root / "json").rename(root / "jsonlib")  # a directory move: every file changes path
    updates.wait(lambda: "jsonlib/decoder.py" in bank_paths(ix), SETTLE_S)
    updates.wait(lambda: not any(p.startswith("json/") for p in bank_paths(ix)), SETTLE_S)
    assert sum(s.chunks_encoded for s in updates.summaries) == 0  # content-addressed: nothing re-encoded


def test_watcher_noise_dirs_cause_no_update(tmp_path):
    """.git internals and our own database never even reach update()."""
    calls: list[list[str]] = []
    w = Watcher(tmp_path, calls.append, debounce=0.05)
    w.start()
    try:
        (tmp_path / ".git").mkdir()
        (tmp_path / ".git/index").write_bytes(b"x")
        (tmp_path / ".longllama").mkdir()
        (tmp_path / ".longllama/index-x.db-wal").write_bytes(b"x")
        time.sleep(0.5)
        assert calls == []
        (tmp_path / "a.py").write_text("a = 1\n")
        deadline = time.monotonic() + SETTLE_S
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls == [["a.py"]]
    finally:
        w.stop()
