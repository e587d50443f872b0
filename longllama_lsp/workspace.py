"""The workspace: the engine and one repository (indexer) per root; the only module that joins them.

    indexer (Repository) -> Workspace -> Engine -> server (service.py) and CLI (commands.py)

The engine reads the repositories' banks through `Workspace.repositories` (the provider it is
given); nothing else appends to or removes from what it reads. A root is opened on first use and
shared by its users (LSP sessions, the CLI), reference-counted; the last user's release closes it.
Indexers encode through the engine's worker (`Engine.on_worker`): one thread owns the model.

Every method blocks (opening and indexing take seconds to minutes): the server runs them on an
executor thread, the CLI calls them directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .assembly import relative
from .repository import ProgressFn, Repository

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger(__name__)

# (root, engine, memory budget in tokens or None) -> a Repository for that root
RepositoryFactory = Callable[[Path, "Engine", "int | None"], Repository]


def open_indexer(root: Path, engine: Engine, budget_tokens: int | None = None) -> Repository:
    """indexer.pipeline.Indexer for `root` on the engine's model; it encodes on the engine's worker.

    While another process writes the index (`longllama watch`, another server), a read-only one
    (status state "read-only"): SQLite lets it read the last commit, an open buffer is encoded in
    memory, nothing is written here, and watching it follows what the writer commits until the
    writer stops; then this process writes the index (Indexer.take_over). Refusing
    instead left a server without any repository memory whenever the user also ran `longllama watch`.
    """
    from indexer.pipeline import Indexer

    from .errors import IndexBusy

    if engine.model_dir is None:
        raise ValueError("indexing needs the model's checkpoint folder (Engine.model_dir)")
    args = (root, engine.model, engine.tokenizer, engine.model_dir)
    try:
        return Indexer.open(*args, budget_tokens=budget_tokens, run_model=engine.on_worker)
    except IndexBusy as busy:
        logger.warning("index %s is being written by another process (PID %s, e.g. `longllama watch` or a "
                       "server): using it read-only as it is; files changed since that process last indexed "
                       "them are not in memory, the files open here are read as they are now",
                       busy.path, busy.holder)
    return Indexer.open(*args, budget_tokens=budget_tokens, run_model=engine.on_worker, readonly=True)


@dataclasses.dataclass(eq=False)
class _Root:
    repository: Repository
    users: set[Hashable] = dataclasses.field(default_factory=set)
    indexed: bool = False  # indexed once and watching


class Workspace:
    """The engine and the repositories it reads; see the module docstring."""

    def __init__(self, engine: Engine, open_repository: RepositoryFactory | None = open_indexer):
        self.engine = engine
        self.open_repository = open_repository  # None: no indexing (memory is the open buffer only)
        self._roots: dict[Path, _Root] = {}
        self._lock = threading.Lock()
        engine.repositories = self.repositories

    def repositories(self) -> tuple[Repository, ...]:
        """What the engine reads now (called on its worker, per request)."""
        with self._lock:
            return tuple(entry.repository for entry in self._roots.values())

    def roots(self) -> list[Path]:
        """The roots open now (resolved)."""
        with self._lock:
            return list(self._roots)

    def open(self, root: Path, user: Hashable, budget_tokens: int | None = None) -> Repository:
        """The repository of `root`, opened on first use and then shared; `user` now uses it."""
        if self.open_repository is None:
            raise RuntimeError("this workspace does not index")
        root = Path(root).resolve()
        with self._lock:
            entry = self._roots.get(root)
        if entry is None:
            opened = self.open_repository(root, self.engine, budget_tokens)
            with self._lock:
                entry = self._roots.get(root)  # another user may have opened it meanwhile
                if entry is None:
                    entry, opened = self._roots.setdefault(root, _Root(opened)), None
            if opened is not None:
                _close(opened)
        with self._lock:
            entry.users.add(user)
        return entry.repository

    def needs_index(self, repo: Repository) -> bool:
        entry = self._entry(repo)
        return entry is not None and not entry.indexed

    def index(self, repo: Repository, progress: ProgressFn | None = None, priority_paths: Sequence[str] = ()
              ) -> Any:
        """A full pass over `repo` (only new content reaches the model), `priority_paths` (files open in
        an editor) and their neighbourhood first; returns its summary."""
        summary = repo.index(progress=progress, priority_paths=priority_paths)
        logger.info("indexed %s: %s", repo.root, summary_line(repo))
        self.engine.warm_retrieval()  # completions' retrieval then finds the chunks' terms read
        return summary

    def watch(self, repo: Repository) -> None:
        """Keep `repo` current from now on (after its first `index`)."""
        entry = self._entry(repo)
        if entry is not None and not entry.indexed:
            repo.start_watching()
            entry.indexed = True

    def reindex(self, user: Hashable) -> None:
        """The next indexing pass of `user` indexes its roots again, even if other users keep them open."""
        with self._lock:
            for entry in self._roots.values():
                if user in entry.users:
                    entry.indexed = False

    def release(self, user: Hashable) -> None:
        """`user` no longer uses its roots; a repository nobody uses is closed."""
        closing = []
        with self._lock:
            for root, entry in list(self._roots.items()):
                entry.users.discard(user)
                if not entry.users:
                    closing.append(self._roots.pop(root).repository)
        for repo in closing:
            _close(repo)

    def touch(self, path: str) -> None:
        """An opened file (`path` absolute, as the editor names it) and its folder rank first when a
        memory budget evicts chunks."""
        if not Path(path).is_absolute():
            return
        for repo in self.repositories():
            rel = relative(path, Path(repo.root).resolve())  # resolved, as the bank names files
            if rel is not None:
                # Without the bank's lock: a request attending to the bank's views holds it until it
                # ends, and this runs on the server's event loop. touch() only sets two priority maps
                # (single dict stores), which the indexer reads when it next evicts.
                repo.bank.touch(rel)

    def close(self) -> None:
        """Close every repository and the engine."""
        with self._lock:
            repos = [entry.repository for entry in self._roots.values()]
            self._roots.clear()
        for repo in repos:
            _close(repo)
        self.engine.close()

    def _entry(self, repo: Repository) -> _Root | None:
        with self._lock:
            return next((e for e in self._roots.values() if e.repository is repo), None)


def memory_untrained(model_dir: Path | None) -> bool:
    """Whether the memory layers of `model_dir` are not FoT-trained: repository memory may then make
    predictions worse (BENCHMARKS.md, issue 6). The server and the CLI each say so once."""
    from .model.loading import memory_training

    return model_dir is not None and memory_training(model_dir) is None


def untrained_memory_warning(model_dir: Path | None, memory_off: str | None = None) -> str | None:
    """What to tell the user once when the memory layers of `model_dir` are untrained, else None;
    `memory_off` says how to turn memory off where they are (a CLI flag, an editor setting)."""
    if not memory_untrained(model_dir):
        return None
    remedy = f"{memory_off}, or train them" if memory_off else "train them"
    return (f"the memory layers of {Path(model_dir).name} are not FoT-trained, so repository memory may make "
            f"predictions worse; {remedy} (longllama finetune)")


def repository_status(repo: Repository) -> dict[str, Any]:
    """The repository's status() as plain JSON (it may hold dataclasses and paths)."""
    def plain(value: Any) -> Any:
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)
    try:
        return json.loads(json.dumps(repo.status(), default=plain))
    except Exception as exc:  # noqa: BLE001 - status must answer even when an indexer is broken
        return {"error": str(exc)}


def summary_line(repo: Repository) -> str:
    d = repository_status(repo)
    return f"{d.get('files', '?')} files, {d.get('chunks', '?')} chunks"


def _close(repo: Repository) -> None:
    try:
        repo.close()
    except Exception:  # noqa: BLE001 - one broken indexer does not keep the others open
        logger.exception("closing the indexer of %s failed", repo.root)
