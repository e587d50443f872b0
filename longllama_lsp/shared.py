"""What the LSP sessions of one process share: the workspace (the engine, loaded once, and one
indexer per root), the engine's ready future and the one-pass-at-a-time indexing lock.

stdio has one session; `tcp.serve_tcp` makes one session per connection, all on one event loop and
one `SharedServices`, so N editors share the model. `multi` (TCP): sessions come and go; the engine
stays loaded until the process ends (`close`), and a session's `shutdown` only releases its roots.
Otherwise (stdio) the only session's `shutdown` closes the engine.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .auth import root_refusal
from .engine import Engine, EngineOptions
from .settings import ModelSettings, Settings
from .workspace import RepositoryFactory, Workspace

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ModelSettings, EngineOptions], Engine]
# A pause longer than the gaps between keys of someone typing: deferred edit encodes wait for it.
DEFER_IDLE_MS = 1000


def engine_options(s: Settings) -> EngineOptions:
    """The engine's options in a language server: its completions never wait for encoding the open file's
    edits (the editor's next keystroke picks them up, EngineOptions.defer_edits), and those encodes start
    after a second without completion requests: longer than the gaps between keys of someone typing."""
    return EngineOptions(mode=s.completion.mode, max_tokens=s.completion.max_tokens, answer_max_tokens=s.ask.max_tokens,
                         context_tokens=s.completion.context_tokens, memory=s.memory.enabled,
                         select_tokens=s.memory.select_tokens, retrieve_tokens=s.memory.retrieve_tokens,
                         knn_weight=s.memory.knn_weight,
                         defer_edits=True, defer_idle_ms=DEFER_IDLE_MS)


def default_engine_factory(model: ModelSettings, options: EngineOptions) -> Engine:
    return Engine.load(model.path, model.device, model.dtype, options=options, decode_dtype=model.decode_dtype)


class SharedServices:
    """See the module docstring. `repository_factory` None: no indexing (memory = open buffers only)."""

    def __init__(self, engine_factory: EngineFactory | None = None,
                 repository_factory: RepositoryFactory | None = None,
                 model_overrides: ModelSettings | None = None, multi: bool = False,
                 allowed_roots: Sequence[Path] | None = None):
        self.engine_factory = engine_factory or default_engine_factory
        self.repository_factory = repository_factory
        self.model_overrides = model_overrides or ModelSettings()
        self.multi = multi
        self.workspace: Workspace | None = None
        self.engine_model: ModelSettings | None = None
        self.engine_ready: asyncio.Future | None = None
        self.index_lock: asyncio.Lock | None = None  # one indexing pass at a time (they share the worker)
        self.sessions: dict[int, Any] = {}  # id -> live session (tcp.serve_tcp)
        # None: every workspace folder is accepted (stdio: the editor is the user). Otherwise (TCP) a
        # folder must be the server user's own or under one of these (auth.root_refusal).
        self.allowed_roots = None if allowed_roots is None else tuple(Path(p).resolve() for p in allowed_roots)
        self.on_roots_changed: Callable[[list[Path]], None] | None = None  # the server record's roots
        self._ids = itertools.count(1)

    @property
    def engine(self) -> Engine | None:
        return self.workspace.engine if self.workspace is not None else None

    def root_refusal(self, root: Path) -> str | None:
        """Why a session may not use `root` as a workspace folder, or None."""
        return None if self.allowed_roots is None else root_refusal(root, self.allowed_roots)

    def roots_changed(self) -> None:
        """A root was opened or released: tell whoever publishes them (server.py's server record)."""
        if self.on_roots_changed is not None and self.workspace is not None:
            try:
                self.on_roots_changed(self.workspace.roots())
            except OSError as exc:
                logger.warning("could not update the server record: %s", exc)

    def new_session_id(self) -> int:
        return next(self._ids)

    def start_engine(self, model: ModelSettings, options: EngineOptions) -> asyncio.Future:
        """The engine's ready future; the first caller creates the engine (its worker loads the model)."""
        if self.engine_ready is None:
            loop = asyncio.get_running_loop()
            self.engine_ready, self.engine_model = loop.create_future(), model
            # unset device/dtype are chosen when the model loads (load.resolve_device_dtype); the engine logs them
            logger.info("loading model %s (device %s, dtype %s)", model.path or "(default)", model.device or "auto",
                        model.dtype or "auto")
            try:
                self.workspace = Workspace(self.engine_factory(model, options), self.repository_factory)
            except Exception as exc:  # noqa: BLE001 - every session shows it (ready_engine), none waits forever
                logger.exception("creating the engine failed")
                self.engine_ready.set_exception(exc)
                self.engine_ready.exception()  # mark retrieved
                return self.engine_ready
            # A fresh context: "model ready" is news for every session, not only the first one.
            loop.create_task(self._wait_engine(), context=contextvars.Context())
        return self.engine_ready

    async def _wait_engine(self) -> None:
        engine, ready = self.engine, self.engine_ready
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.wait_ready)
        except Exception as exc:  # noqa: BLE001 - every session shows it, the server keeps answering
            ready.set_exception(exc)
            ready.exception()  # mark retrieved
            return
        ready.set_result(engine)
        logger.info("model ready: %s", engine.status())

    def close(self) -> None:
        """The process is ending: close every indexer and the engine."""
        if self.workspace is not None:
            self.workspace.close()
