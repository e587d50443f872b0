"""The request queue and the one thread that owns the model (house style 22).

Callers on any thread `submit` a function; it runs on the worker, which hands its result or error to
the request's future. Lower priority values run first (completions and answers before indexing
encodes). Per `key` the newest request wins: submitting one cancels the older ones. Cancellation is
a flag the running function checks between model steps (`Request.check`), so it stops within one.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)

FOREGROUND, BACKGROUND = 0, 1  # queue priorities: completions and answers, then indexing encodes


class Cancelled(Exception):
    """The request was cancelled: by the client, or by a newer request for the same document."""


class Closed(RuntimeError):
    """The worker is closed (the engine shut down): it takes no more work."""


class AfterIdle:
    """Calls `fire` (on a timer thread) once no `touch` has come for the seconds the last touch gave.

    Background work on the worker cannot be preempted once it starts, so work that would delay the next
    keystroke (encoding an edited chunk: 0.5-1 s on a CPU thread) waits for a pause in typing."""

    def __init__(self, fire: Callable[[], None]):
        self._fire = fire
        self._lock = threading.Lock()
        self._due = 0.0  # time.monotonic() before which `fire` must not run
        self._timer: threading.Timer | None = None

    def touch(self, idle_s: float) -> None:
        with self._lock:
            self._due = time.monotonic() + idle_s

    def busy(self) -> bool:
        """A touch came less than its idle time ago."""
        with self._lock:
            return time.monotonic() < self._due

    def schedule(self) -> None:
        """`fire` once idle (now, if it is); a pending call is not doubled."""
        with self._lock:
            if self._timer is None:
                self._arm(max(0.0, self._due - time.monotonic()))

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _arm(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        with self._lock:
            wait = self._due - time.monotonic()
            if wait > 0:  # touched since it was armed
                self._arm(wait)
                return
            self._timer = None
        self._fire()


class Request:
    """A queued unit of work; `future` resolves to its result, or raises Cancelled."""

    _ids = itertools.count(1)

    def __init__(self, fn: Callable[[Request], Any], key: Hashable | None = None, priority: int = FOREGROUND):
        self.id = next(self._ids)
        self.fn, self.key, self.priority = fn, key, priority
        self.future: Future = Future()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.superseded = False  # cancelled because a newer request with the same key arrived
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()
        self.future.cancel()  # succeeds only while queued

    def supersede(self) -> None:
        """Cancel as stale: a newer request with the same key arrived, or the client dropped it."""
        self.superseded = True
        self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise Cancelled if the request was cancelled (called between model steps)."""
        if self._cancel.is_set():
            raise Cancelled(f"request {self.id} cancelled")

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)


class Worker:
    """One thread: `start()` runs `setup` on it (loading the model), then serves the queue.

    `wrap(fn, request)` runs each request's function (the engine enters torch.inference_mode there).
    """

    def __init__(self, setup: Callable[[], None], wrap: Callable[[Callable[[Request], Any], Request], Any]):
        self._setup, self._wrap = setup, wrap
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._latest: dict[Hashable, Request] = {}
        self._lock = threading.Lock()  # guards _latest, and _closed against a racing submit
        self._closed = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "typeahead": 0}
        # Worker milliseconds spent per outcome: "cancelled" is the compute that typing threw away.
        self.busy_ms = {"completed": 0.0, "cancelled": 0.0, "failed": 0.0}
        self.running: int | None = None  # id of the request on the worker
        self._thread = threading.Thread(target=self._run, name="longllama-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[[Request], Any], key: Hashable | None = None,
               priority: int = FOREGROUND) -> Request:
        """Queue fn(request). A request with a `key` cancels older ones with that key."""
        req = Request(fn, key, priority)
        with self._lock:
            if self._closed:
                raise Closed("the engine is closed")
            older = self._latest.get(key) if key is not None else None
            if key is not None:
                self._latest[key] = req
            self._queue.put((priority, next(self._seq), req))
        if older is not None:
            older.supersede()
        return req

    def answered(self, req: Request, result: Any) -> Request:
        """`req` (not queued) resolved at once with `result`; it supersedes older requests of its key."""
        with self._lock:
            older = self._latest.pop(req.key, None) if req.key is not None else None
        if older is not None:
            older.supersede()
        req.future.set_running_or_notify_cancel()
        req.future.set_result(result)
        return req

    def cancel(self, key: Hashable) -> None:
        """Cancel the newest request for `key` as stale (its caller gets an empty result, not an error)."""
        with self._lock:
            req = self._latest.get(key)
        if req is not None:
            req.supersede()

    def close(self) -> None:
        """Cancel all queued work and stop the thread (the running request stops at its next step)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._latest.values())
            self._queue.put((-1, -1, None))
        for req in pending:
            req.cancel()
        if self._thread.is_alive() and not self.on_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        self._setup()
        while True:
            _, _, req = self._queue.get()
            if req is None:
                self._drain()
                return
            if req.future.set_running_or_notify_cancel():
                self._serve(req)
            else:  # cancelled while queued: the caller has heard already
                self.counts["cancelled"] += 1

    def _drain(self) -> None:
        """Closed: what is still queued (unkeyed background work too) is cancelled, so no caller waits forever."""
        while True:
            try:
                _, _, req = self._queue.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                req.cancel()

    def _serve(self, req: Request) -> None:
        req.started = time.perf_counter()
        self.running = req.id
        result: Any = None
        error: BaseException | None = None
        try:
            req.check()
            result = self._wrap(req.fn, req)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            error = exc
            if not isinstance(exc, (Cancelled, ValueError)):
                logger.exception("request %s failed", req.id)
        outcome = "completed" if error is None else "cancelled" if isinstance(error, Cancelled) else "failed"
        # Counted and off the worker before the caller hears: one who sees its answer (or `running` is None)
        # then reads `counts` must find this request in them.
        self.counts[outcome] += 1
        self.busy_ms[outcome] += (time.perf_counter() - req.started) * 1000
        self.running = None
        with self._lock:
            if req.key is not None and self._latest.get(req.key) is req:
                del self._latest[req.key]
        if error is None:
            req.future.set_result(result)
        else:
            req.future.set_exception(error)
