"""The workspace: one repository per root between the indexer and the engine, one owner of the model.

Test Data: a seeded tiny LongLLaMA + SmolLM2 tokenizer (tests/helpers_models.py) loaded by the
engine's worker; a two-file Python repository written to tmp_path, indexed by the real
indexer.pipeline (SQLite store, tree-sitter chunks, MemoryBank).
"""

from __future__ import annotations

import contextlib
import threading

import pytest
from helpers_models import smol_tokenizer_dir, tiny_model_dir  # noqa: F401

from longllama_lsp.engine import Engine, EngineOptions
from longllama_lsp.repository import Repository
from longllama_lsp.worker import BACKGROUND, Cancelled, Worker
from longllama_lsp.workspace import Workspace


@pytest.fixture
def repo_dir(tmp_path):
    (tmp_path / "a.py").write_text("def greet(name):\n    return 'hello ' + name\n")
    (tmp_path / "b.py").write_text("class Greeter:\n    def __init__(self, prefix):\n        self.prefix = prefix\n")
    return tmp_path


@pytest.fixture
def workspace(tiny_model_dir):  # noqa: F811
    engine = Engine.load(tiny_model_dir, "cpu", decode_dtype="float32",
                         options=EngineOptions(max_tokens=4, answer_max_tokens=4))
    engine.wait_ready()
    ws = Workspace(engine)
    yield ws
    ws.close()


def test_indexers_encode_on_the_engine_worker_and_feed_its_memory(workspace, repo_dir):
    model = workspace.engine.model
    threads: list[str] = []
    encode = model.encode_memory

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    model.encode_memory = recording
    try:
        repo = workspace.open(repo_dir, user="one")
        assert isinstance(repo, Repository) and workspace.open(repo_dir, user="two") is repo  # shared per root
        assert workspace.needs_index(repo)
        workspace.index(repo)
        workspace.watch(repo)
        assert not workspace.needs_index(repo)
    finally:
        del model.encode_memory
    assert threads and set(threads) == {"longllama-engine"}, "the worker owns the model: no encode elsewhere"
    assert workspace.repositories() == (repo,) and workspace.engine.repositories() == (repo,)
    done = workspace.engine.complete("def main():\n    g = Gre", 23, path=str(repo_dir / "main.py"))
    assert done.memory_tokens == repo.bank.status().span_tokens > 0  # every slot, block padding included
    workspace.release("one")
    assert workspace.repositories() == (repo,)  # "two" still uses it
    workspace.release("two")
    assert workspace.repositories() == () and repo._watcher is None  # closed: watching stopped


def test_reindex_marks_only_the_users_roots(workspace, repo_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    (other / "c.py").write_text("X = 1\n")
    mine, theirs = workspace.open(repo_dir, user="me"), workspace.open(other, user="them")
    for repo in (mine, theirs):
        workspace.index(repo)
        workspace.watch(repo)
    workspace.reindex("me")
    assert workspace.needs_index(mine) and not workspace.needs_index(theirs)


def test_closing_the_worker_cancels_queued_background_work():
    """An indexer waiting on an encode must not wait forever when the engine closes."""
    release = threading.Event()
    worker = Worker(setup=lambda: None, wrap=lambda fn, req: fn(req))
    worker.start()
    running = threading.Event()
    blocker = worker.submit(lambda _req: running.set() or release.wait(10))
    assert running.wait(10)  # close() cancels what is still queued: the blocker must be running already
    queued = worker.submit(lambda _req: "never", priority=BACKGROUND)
    closer = threading.Thread(target=worker.close)
    closer.start()
    release.set()
    closer.join(10)
    assert blocker.result(timeout=10) is True
    with pytest.raises((Cancelled, Exception)) as exc:
        queued.result(timeout=10)
    assert not isinstance(exc.value, TimeoutError)
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda _req: None)


@pytest.mark.parametrize("outcome", ["completed", "cancelled", "failed"])
def test_a_request_is_counted_before_its_caller_hears(outcome):
    """The server's status (a cancel test read it) must count a request once its caller has the answer."""
    def fn(req):
        if outcome == "cancelled":
            req.cancel()
            req.check()
        if outcome == "failed":
            raise ValueError("bad input")
        return "done"

    worker = Worker(setup=lambda: None, wrap=lambda fn, req: fn(req))
    worker.start()
    try:
        req = worker.submit(fn)
        seen = []  # done callbacks run on the worker thread the moment the future resolves: no race to win
        req.future.add_done_callback(lambda _f: seen.append((dict(worker.counts), worker.running)))
        with pytest.raises((Cancelled, ValueError)) if outcome != "completed" else contextlib.nullcontext():
            req.result(timeout=10)
        assert seen == [({**dict.fromkeys(worker.counts, 0), outcome: 1}, None)]
    finally:
        worker.close()


def test_a_request_cancelled_while_queued_is_counted():
    release = threading.Event()
    worker = Worker(setup=lambda: None, wrap=lambda fn, req: fn(req))
    worker.start()
    try:
        running = threading.Event()
        blocker = worker.submit(lambda _req: running.set() or release.wait(10))
        assert running.wait(10)
        queued = worker.submit(lambda _req: "never")
        queued.cancel()
        release.set()
        assert blocker.result(timeout=10) is True
        after = worker.submit(lambda _req: "after")  # served after the cancelled one was taken off the queue
        assert after.result(timeout=10) == "after"
        assert worker.counts["cancelled"] == 1 and worker.counts["completed"] == 2
    finally:
        worker.close()


def test_touch_ranks_a_file_reached_through_a_symlink(workspace, repo_dir, tmp_path_factory):
    """The editor may open a file through a symlinked folder; the bank names it by its resolved path."""
    link = tmp_path_factory.mktemp("links") / "ws"
    link.symlink_to(repo_dir, target_is_directory=True)
    repo = workspace.open(repo_dir, user="me")
    workspace.index(repo)
    meta = next(iter(repo.bank.chunks_of("a.py").values()))
    untouched = repo.bank.priority(meta)
    workspace.touch(str(repo_dir / ".." / "a.py"))  # outside the root, whatever its name
    assert repo.bank.priority(meta) == untouched
    workspace.touch(str(link / "a.py"))
    assert repo.bank.priority(meta)[0] > untouched[0]
