"""File watching: watchdog events -> debounced, coalesced `update(paths)` calls.

Editors save atomically (write a temp file, rename it over the original) and `git checkout` touches
thousands of files at once; both arrive as bursts of events. Paths are collected in a set and
flushed `debounce` seconds after the last event (at the latest `max_delay` after the first), so a
burst costs one update. Ignore rules are applied by the indexer's update, not here; this module only
drops the obviously irrelevant (.git internals, our own database).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

logger = logging.getLogger(__name__)

NOISE_DIRS = (".git", ".longllama", "__pycache__", "node_modules", ".venv")


class Watcher(FileSystemEventHandler):
    def __init__(self, root: Path, update: Callable[[list[str]], object], debounce: float = 0.3,
                 max_delay: float = 3.0, on_update: Callable[[object], None] | None = None):
        self.root, self.update, self.debounce, self.max_delay = Path(root).resolve(), update, debounce, max_delay
        self.on_update = on_update
        self._pending: set[str] = set()
        self._first = self._last = 0.0
        self._cond = threading.Condition()
        self._stopped = False
        self._observer = Observer()
        self._thread = threading.Thread(target=self._flush_loop, name="longllama-watch", daemon=True)
        self.updates = 0  # flushes done, for tests and status

    def start(self) -> None:
        self._observer.schedule(self, str(self.root), recursive=True)
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._observer.stop()
        self._observer.join(timeout=5)
        self._thread.join(timeout=5)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path] + ([event.dest_path] if getattr(event, "dest_path", "") else [])
        relevant = [p for p in map(self._relative, paths) if p is not None]
        if not relevant:
            return
        with self._cond:
            now = time.monotonic()
            if not self._pending:
                self._first = now
            self._pending.update(relevant)
            self._last = now
            self._cond.notify_all()

    def _relative(self, path: str | bytes) -> str | None:
        path = path.decode() if isinstance(path, bytes) else path
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return None
        if not rel.parts or rel.parts[0] in NOISE_DIRS or any(p in NOISE_DIRS for p in rel.parts):
            return None
        return rel.as_posix()

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._due():
                    self._cond.wait(timeout=self.debounce / 2 if self._pending else None)
                if self._stopped:
                    return
                batch, self._pending = sorted(self._pending), set()
            try:
                result = self.update(batch)
                self.updates += 1
                if self.on_update is not None:
                    self.on_update(result)
            except Exception:  # a bad file must not kill the watcher
                logger.exception("update of %d paths failed", len(batch))

    def _due(self) -> bool:
        if not self._pending:
            return False
        now = time.monotonic()
        return now - self._last >= self.debounce or now - self._first >= self.max_delay
