"""The language server's state and services: documents, settings, the engine, the indexers.

`LongLlamaServer` is pygls' LanguageServer with what the handlers in server.py call: completion and
ask (through the Engine, whose worker thread owns the model), status, settings updates, and
indexing of every workspace folder with work-done progress. The engine loads after `initialized`;
the indexers start once it is ready, and completions use whatever is indexed so far.

One `LongLlamaServer` is one LSP session (its documents, settings, initialize/shutdown, auth). What a
process holds once is in `SharedServices`: the engine (the model is loaded once) and one indexer per
workspace root. stdio has one session; `serve_tcp` makes one session per connection, all on one
event loop and one `SharedServices`, so N editors share the model. A session's completions are keyed
by (session, uri) in the engine, so editors do not supersede each other; a dropped connection
cancels that session's pending requests and releases its roots.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hmac
import itertools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lsprotocol import types
from pygls.exceptions import (
    JsonRpcInvalidParams,
    JsonRpcParseError,
    JsonRpcServerError,
    JsonRpcServerNotInitialized,
)
from pygls.io_ import run_async
from pygls.lsp.server import LanguageServer
from pygls.protocol.language_server import lsp_method
from pygls.uris import from_fs_path, to_fs_path

from . import __version__
from .documents import Document, Documents, PositionError, UnknownDocument
from .engine import Answer, Cancelled, Completion, Engine, EngineOptions, Source
from .prompt import word_before
from .protocol import MODEL_UNAVAILABLE, UNAUTHORIZED, AskResult, ReindexResult, SourceInfo, StatusResult
from .protocol import converter as wire_converter
from .rpc import LongLlamaProtocol
from .settings import ModelSettings, Settings, parse_settings, to_camel_dict

logger = logging.getLogger(__name__)

MAX_DOCUMENT_CHARS = 4_000_000  # ~100k lines; larger buffers are refused rather than tokenized per keystroke
MAX_QUESTION_CHARS = 20_000
PROGRESS_EVERY_S = 0.2  # throttle $/progress reports

MAX_TCP_SESSIONS = 64  # concurrent connections; more are closed at once (each holds documents and caches)

EngineFactory = Callable[[ModelSettings, EngineOptions], Engine]
IndexerFactory = Callable[[Path, Engine, Settings], Any]

# The session whose handler is running (set per TCP connection task; tasks inherit it): its log
# records go to that editor only. Records from other threads (engine worker, indexer) go to all.
CURRENT_SESSION: contextvars.ContextVar[Any] = contextvars.ContextVar("longllama_session", default=None)


@dataclasses.dataclass(eq=False)
class _SharedRoot:
    indexer: Any
    users: set[int] = dataclasses.field(default_factory=set)  # session ids
    indexed: bool = False  # indexed once and watching


class SharedServices:
    """What the sessions of one process share: the engine (one model, one worker thread) and one
    indexer per workspace root, reference-counted by the sessions that use that root.

    `multi` (TCP): sessions come and go; the engine stays loaded until the process ends (`close`), and
    a session's `shutdown` only releases its roots. Otherwise (stdio) the only session's `shutdown`
    closes the engine, as before."""

    def __init__(self, engine_factory: EngineFactory | None = None, indexer_factory: IndexerFactory | None = None,
                 model_overrides: ModelSettings | None = None, multi: bool = False):
        self.engine_factory = engine_factory or default_engine_factory
        self.indexer_factory = indexer_factory
        self.model_overrides = model_overrides or ModelSettings()
        self.multi = multi
        self.engine: Engine | None = None
        self.engine_model: ModelSettings | None = None
        self.engine_ready: asyncio.Future | None = None
        self.roots: dict[Path, _SharedRoot] = {}
        self.index_lock: asyncio.Lock | None = None  # one indexing pass at a time (they share the worker)
        self.sessions: dict[int, Any] = {}  # id -> live session (serve_tcp)
        self._ids = itertools.count(1)

    def new_session_id(self) -> int:
        return next(self._ids)

    def start_engine(self, model: ModelSettings, options: EngineOptions) -> asyncio.Future:
        """The engine's ready future; the first caller creates the engine (its worker loads the model)."""
        if self.engine_ready is None:
            loop = asyncio.get_running_loop()
            self.engine_ready, self.engine_model = loop.create_future(), model
            logger.info("loading model %s (device %s, dtype %s)", model.path or "(default)", model.device, model.dtype)
            try:
                self.engine = self.engine_factory(model, options)
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

    async def acquire_root(self, root: Path, session_id: int, settings: Settings) -> _SharedRoot:
        """The root's indexer (opened on first use, then shared); `session_id` now uses it."""
        entry = self.roots.get(root)
        if entry is None:
            indexer = await asyncio.get_running_loop().run_in_executor(
                None, self.indexer_factory, root, self.engine, settings)
            entry = self.roots.get(root)  # another session may have opened it meanwhile
            if entry is None:
                entry = self.roots[root] = _SharedRoot(indexer)
                self.engine.repositories.append(indexer)  # serve from what is indexed so far
            else:
                _close_indexer(indexer)
        entry.users.add(session_id)
        return entry

    def release_roots(self, session_id: int) -> None:
        """`session_id` no longer uses its roots; an indexer nobody uses is closed."""
        for root, entry in list(self.roots.items()):
            entry.users.discard(session_id)
            if not entry.users:
                del self.roots[root]
                _close_indexer(entry.indexer)
                if self.engine is not None and entry.indexer in self.engine.repositories:
                    self.engine.repositories.remove(entry.indexer)

    def close(self) -> None:
        """The process is ending: close every indexer and the engine."""
        for entry in self.roots.values():
            _close_indexer(entry.indexer)
        self.roots.clear()
        if self.engine is not None:
            self.engine.close()


def _close_indexer(indexer: Any) -> None:
    try:
        (getattr(indexer, "close", None) or indexer.stop)()
    except Exception:  # noqa: BLE001
        logger.exception("stopping the indexer failed")


class LongLlamaServer(LanguageServer):
    """The language server: documents, settings, the engine and the indexers (see module docstring)."""

    protocol: LongLlamaProtocol

    def __init__(self, engine_factory: EngineFactory | None = None, indexer_factory: IndexerFactory | None = None,
                 auth_token: str | None = None, model_overrides: ModelSettings | None = None,
                 shared: SharedServices | None = None):
        shared = shared or SharedServices(engine_factory, indexer_factory, model_overrides)
        super().__init__("longllama-lsp", __version__,
                         protocol_cls=TcpSessionProtocol if shared.multi else LongLlamaProtocol, max_workers=4,
                         converter_factory=wire_converter,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.shared = shared
        self.session_id = shared.new_session_id()
        self.documents = Documents()
        self.settings = Settings()
        self.engine_factory = shared.engine_factory
        self.indexer_factory = shared.indexer_factory
        self.model_overrides = shared.model_overrides
        self.auth_token = auth_token
        self.authenticated = auth_token is None
        self.engine: Engine | None = None
        self.indexers: list[Any] = []
        self.indexing_state = "off" if indexer_factory is None else "waiting"
        self.indexing_error: str | None = None
        self.roots: list[Path] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._engine_ready: asyncio.Future | None = None
        self._problems: list[str] = []
        self._tickets: dict[str, int] = {}
        self._supports_progress = False
        self._shown_errors: set[str] = set()
        self.ended = False

    def engine_key(self, uri: str) -> Hashable:
        """The engine's newest-wins and prefix-cache key of a document: per session when sessions share it."""
        return (self.session_id, uri) if self.shared.multi else uri

    # -- plumbing -----------------------------------------------------------------------------------

    def may_serve(self, initialize_received: bool) -> bool:
        return initialize_received and self.authenticated

    @property
    def position_encoding(self) -> str:
        try:
            return self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        except RuntimeError:
            return types.PositionEncodingKind.Utf16

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn on the event loop (notifications from worker and indexer threads)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def show(self, message: str, kind: types.MessageType = types.MessageType.Warning, once: bool = False) -> None:
        if once:
            if message in self._shown_errors:
                return
            self._shown_errors.add(message)
        self.call_soon(self.window_show_message, types.ShowMessageParams(type=kind, message=message))

    def report_server_error(self, error: Exception, source: Any) -> None:
        # A body that is not JSON: answer with ParseError (id null), as JSON-RPC 2.0 §5.1 asks. That
        # includes bytes that are not UTF-8 and nesting deeper than the parser's recursion limit.
        if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, RecursionError)) \
                and self.protocol.writer is not None:
            reason = "too deeply nested" if isinstance(error, RecursionError) else str(error)
            self.protocol._send_response(None, error=JsonRpcParseError(f"Parse error: {reason}").to_response_error())
            return
        logger.error("server error (%s): %s", getattr(source, "__name__", source), error)

    # -- lifecycle ------------------------------------------------------------------------------------

    def on_initialize(self, params: types.InitializeParams) -> None:
        options = params.initialization_options if isinstance(params.initialization_options, dict) else {}
        if self.auth_token is not None:
            token = options.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token, self.auth_token):
                raise JsonRpcServerError("unauthorized: initializationOptions.token does not match", UNAUTHORIZED)
            self.authenticated = True
        self.settings, self._problems = parse_settings(params.initialization_options)
        apply_log_level(self.settings.log_level)
        folders = params.workspace_folders or []
        uris = [f.uri for f in folders] or [u for u in [params.root_uri] if u]
        if not uris and params.root_path:
            uris = [from_fs_path(params.root_path)]
        self.roots = [Path(p) for p in (to_fs_path(u) for u in uris) if p]
        window = params.capabilities.window
        self._supports_progress = bool(window and window.work_done_progress)

    async def on_initialized(self) -> None:
        if self.ended or self._engine_ready is not None:
            return
        self.loop = asyncio.get_running_loop()
        _LspLogHandler.install(self)
        for problem in self._problems:
            self.show(f"longllama: invalid setting {problem}")
        model = self.effective_model_settings()
        if self.shared.engine_ready is not None and model != self.shared.engine_model:
            self.show("longllama: this server already runs another model; model settings take effect when the "
                      "server restarts", types.MessageType.Info)
        self._engine_ready = self.shared.start_engine(model, engine_options(self.settings))
        self.engine = self.shared.engine
        asyncio.ensure_future(self._after_load())

    async def _after_load(self) -> None:
        try:
            await asyncio.shield(self._engine_ready)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - shown to the user, the server keeps answering
            self.show(f"longllama: the model could not be loaded: {exc}", types.MessageType.Error)
            self.indexing_state = "off"
            return
        self.warn_if_memory_untrained()
        if self.settings.indexing.enabled and self.indexer_factory is not None and not self.ended:
            await self.start_indexing()

    def warn_if_memory_untrained(self) -> None:
        """Untrained memory layers make completions worse (BENCHMARKS.md, issue 6): say so once."""
        from .model.loading import memory_training

        model_dir = getattr(self.engine, "model_dir", None)
        if self.settings.memory.enabled and model_dir is not None and memory_training(model_dir) is None:
            self.show(f"longllama: the memory layers of {Path(model_dir).name} are not FoT-trained, so repository "
                      f"memory may make completions worse; set memory.enabled = false or train them "
                      f"(longllama finetune)", types.MessageType.Warning, once=True)

    def effective_model_settings(self) -> ModelSettings:
        s, o = self.settings.model, self.model_overrides
        return ModelSettings(path=o.path or s.path, device=o.device or s.device, dtype=o.dtype or s.dtype,
                             decode_dtype=o.decode_dtype or s.decode_dtype)

    def shutdown_all(self) -> None:
        """The client's `shutdown`: release this session's indexers; the engine closes with the last
        (stdio) session, or when a TCP server's process ends."""
        self.stop_indexing()
        if self.engine is not None and not self.shared.multi:
            self.engine.close()

    def end_session(self) -> None:
        """The connection is gone (exit, EOF or a reset): cancel what it still waits for, release its
        roots, stop its logs. Other sessions and the shared engine are untouched."""
        if self.ended:
            return
        self.ended = True
        _LspLogHandler.uninstall(self)
        self.protocol.set_writer(_Discard())  # replies to the cancelled requests go nowhere
        for future in list(self.protocol._request_futures.values()):
            future.cancel()  # the handlers' _await cancels their engine requests
        self.protocol._request_futures.clear()
        if self.engine is not None:
            for uri in list(self._tickets):
                self.engine.cancel(self.engine_key(uri))
        self._tickets.clear()
        self.stop_indexing()
        if self._stop_event is not None:
            self._stop_event.set()
        if self._thread_pool is not None:
            self._thread_pool.shutdown(wait=False, cancel_futures=True)

    def update_settings(self, data: Any) -> None:
        if isinstance(data, dict) and isinstance(data.get("longllama"), dict):
            data = data["longllama"]
        if data is None:
            return
        old = self.settings
        self.settings, problems = parse_settings(data, base=old)
        for problem in problems:
            self.show(f"longllama: invalid setting {problem}")
        apply_log_level(self.settings.log_level)
        if self.engine is not None:  # what requests do not carry (context tokens): shared, the last update wins
            self.engine.options = engine_options(self.settings)
        if self.settings.model != old.model and self.engine is not None:
            self.show("longllama: model settings take effect when the server restarts", types.MessageType.Info)
        if self.settings.indexing.enabled != old.indexing.enabled and self.indexer_factory is not None:
            if self.settings.indexing.enabled:
                asyncio.ensure_future(self.start_indexing())
            else:
                self.stop_indexing()

    # -- indexing -------------------------------------------------------------------------------------

    async def start_indexing(self) -> None:
        """One indexer per workspace folder (shared with other sessions on the same root), index with
        work-done progress, then watch. A root another session already indexed is only joined."""
        if self.engine is None or self.engine.state != "ready" or self.indexing_state == "indexing" or self.ended:
            return
        self.stop_indexing()
        self.indexing_state, self.indexing_error = "indexing", None
        shared = self.shared
        shared.index_lock = shared.index_lock or asyncio.Lock()
        try:
            async with shared.index_lock:
                entries = []
                for root in self.roots:
                    if self.ended:
                        return
                    entries.append(await shared.acquire_root(root, self.session_id, self.settings))
                    self.indexers.append(entries[-1].indexer)
                for entry in entries:
                    if not entry.indexed and not self.ended:
                        await self._index_with_progress(entry.indexer)
                        if self.ended or self.session_id not in entry.users:
                            return  # the session ended meanwhile: its roots were released
                        await self.loop.run_in_executor(None, entry.indexer.start_watching)
                        entry.indexed = True
            self.indexing_state = "watching" if self.indexers else "idle"
        except Exception as exc:  # noqa: BLE001 - completions keep working without (some) memory
            logger.exception("indexing failed")
            self.indexing_state, self.indexing_error = "error", str(exc)
            self.show(f"longllama: indexing failed: {exc}", types.MessageType.Error)

    def stop_indexing(self) -> None:
        self.shared.release_roots(self.session_id)
        self.indexers = []
        self.indexing_state = "off" if not self.settings.indexing.enabled else self.indexing_state

    async def _index_with_progress(self, indexer: Any) -> None:
        root = Path(getattr(indexer, "root", "."))
        token = f"longllama-index-{uuid.uuid4()}"
        progress = self._supports_progress
        if progress:
            try:
                await asyncio.wait_for(self.work_done_progress.create_async(token), 10)
            except Exception:  # noqa: BLE001 - the client refused or never answered: index silently
                progress = False
        if progress:
            self.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                title="LongLLaMA: indexing", message=root.name, percentage=0, cancellable=False))
        last = [0.0]

        def report(p: Any, total: int | None = None, message: str = "") -> None:
            """indexer.pipeline.Progress (phase 'scan' over files, then 'encode' over chunks), or
            (done, total, message) from simpler indexers."""
            if total is not None:
                p = SimpleNamespace(phase="encode", done=p, total=total, message=message)
            now = time.monotonic()
            if now - last[0] < PROGRESS_EVERY_S and p.done < p.total:
                return
            last[0] = now
            share = (0, 20) if p.phase == "scan" else (20, 80)  # scanning is cheap next to encoding
            pct = share[0] + (share[1] * p.done) // p.total if p.total else None
            unit = "files" if p.phase == "scan" else "chunks"
            text = f"{p.phase} {p.done}/{p.total} {unit} {getattr(p, 'message', '')}".strip()
            if progress:
                self.call_soon(self.work_done_progress.report, token,
                               types.WorkDoneProgressReport(message=text, percentage=pct))
            logger.debug("indexing %s: %s", root, text)

        try:
            await self.loop.run_in_executor(None, lambda: indexer.index(progress=report))
        finally:
            if progress:
                summary = _index_summary(indexer)
                self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=summary))
        logger.info("indexed %s: %s", root, _index_summary(indexer))

    def touch(self, uri: str) -> None:
        """An opened file (and its folder) ranks first when the memory budget evicts chunks."""
        path = to_fs_path(uri)
        path = os.path.normpath(path) if path else path  # ws/../outside is not inside ws
        for indexer in self.indexers:
            bank, root = getattr(indexer, "bank", None), Path(getattr(indexer, "root", "/"))
            if path and bank is not None and hasattr(bank, "touch") and Path(path).is_relative_to(root):
                with getattr(indexer, "lock", None) or contextlib.nullcontext():
                    bank.touch(Path(path).relative_to(root).as_posix())

    def reindex(self) -> ReindexResult:
        if self.indexer_factory is None or not self.settings.indexing.enabled or self.engine is None \
                or self.engine.state != "ready":
            return ReindexResult(started=False)
        for entry in self.shared.roots.values():
            if self.session_id in entry.users:
                entry.indexed = False  # index again even if other sessions keep the indexer open
        asyncio.ensure_future(self.start_indexing())
        return ReindexResult(started=True, roots=[str(r) for r in self.roots])

    # -- completion and ask -----------------------------------------------------------------------------

    def document_and_offset(self, uri: str, position: types.Position) -> tuple[Document, int]:
        try:
            doc = self.documents.get(uri)
            offset = doc.offset_at(position, self.position_encoding)
        except (UnknownDocument, PositionError) as exc:
            raise JsonRpcInvalidParams(str(exc)) from None
        if len(doc.text) > MAX_DOCUMENT_CHARS:
            raise JsonRpcInvalidParams(f"document too large: {len(doc.text)} characters (limit {MAX_DOCUMENT_CHARS})")
        return doc, offset

    async def ready_engine(self, required: bool = True) -> Engine | None:
        """The engine once loaded. If it failed to load (the user was told once): an error when
        `required`, else None, so completions come back empty instead of failing on every keystroke."""
        if self._engine_ready is None:
            raise JsonRpcServerNotInitialized()
        try:
            return await asyncio.shield(self._engine_ready)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            if not required:
                return None
            raise JsonRpcServerError(f"the model is unavailable: {exc}", MODEL_UNAVAILABLE) from None

    async def complete(self, uri: str, position: types.Position, automatic: bool = False,
                       sources: bool = True) -> tuple[Completion | None, Document]:
        """One completion at `position` (None when superseded by a newer request for the document),
        and the document as it was when the request arrived: the position refers to that version.
        sources=False: the reply has no place for them (inline completion), so they are not computed."""
        doc, offset = self.document_and_offset(uri, position)
        snapshot = Document(uri, doc.text, doc.version, doc.language_id)
        text = doc.text
        ticket = self._tickets[uri] = self._tickets.get(uri, 0) + 1
        engine = await self.ready_engine(required=False)
        if engine is None:
            return None, snapshot
        c = self.settings.completion  # per request: sessions share the engine, not their settings
        if automatic:
            known = engine.typeahead(self.engine_key(uri), text, offset, c.mode)  # no model: no debounce
            if known is not None:
                return await self._await(known), snapshot
            delay = c.debounce_ms if word_before(text[max(0, offset - 1):offset]) else c.boundary_debounce_ms
            if delay:
                await asyncio.sleep(delay / 1000)
        if self._tickets.get(uri) != ticket:
            return None, snapshot
        req = engine.submit_complete(text, offset, path=to_fs_path(uri) or uri, key=self.engine_key(uri),
                                     mode=c.mode, max_tokens=c.max_tokens, memory=self.settings.memory.enabled,
                                     sources=sources)
        return await self._await(req), snapshot

    def document_changed(self, uri: str) -> None:
        """A pending or running completion for `uri` is stale now: free the worker for the next one."""
        self._tickets[uri] = self._tickets.get(uri, 0) + 1
        if self.engine is not None:
            self.engine.cancel(self.engine_key(uri))

    async def ask(self, question: str, uri: str | None = None, max_tokens: int | None = None) -> AskResult:
        if not question.strip():
            raise JsonRpcInvalidParams("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise JsonRpcInvalidParams(f"question too long: {len(question)} characters (limit {MAX_QUESTION_CHARS})")
        document = None
        if uri is not None:
            try:
                document = (to_fs_path(uri) or uri, self.documents.get(uri).text)
            except UnknownDocument as exc:
                raise JsonRpcInvalidParams(str(exc)) from None
        engine = await self.ready_engine()
        answer: Answer | None = await self._await(engine.submit_answer(
            question, document=document, max_tokens=max_tokens or self.settings.ask.max_tokens,
            memory=self.settings.memory.enabled, key=self.engine_key("longllama/ask")))
        if answer is None:
            raise JsonRpcServerError("the question was superseded by a newer one", -32000)
        return AskResult(answer.text, [self.source_info(s) for s in answer.sources], answer.stop_reason,
                         answer.timings)

    async def _await(self, req: Any) -> Any:
        """Wait for an engine request; $/cancelRequest (task cancellation) cancels it in the engine."""
        try:
            return await asyncio.wrap_future(req.future)
        except asyncio.CancelledError:
            req.cancel()
            task = asyncio.current_task()
            if req.superseded and not (task is not None and getattr(task, "cancelling", lambda: 1)()):
                return None
            raise
        except Cancelled:
            return None
        except ValueError as exc:
            raise JsonRpcInvalidParams(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - house style 21: log, show, return empty
            logger.exception("request failed")
            self.show(f"longllama: {type(exc).__name__}: {exc}", types.MessageType.Error, once=True)
            return None

    def source_info(self, s: Source) -> SourceInfo:
        path = s.path
        if Path(path).is_absolute():  # the open buffer outside any indexed root: relative to a folder
            for root in self.roots:
                if Path(path).is_relative_to(root):
                    path = Path(path).relative_to(root).as_posix()
                    break
        return SourceInfo(path, s.start_line, s.end_line, round(s.weight, 4), s.symbol,
                          from_fs_path(s.file) if s.file else None)

    def status(self) -> StatusResult:
        engine = self.engine.status() if self.engine is not None else {"state": "loading", "model": ""}
        details = [_indexer_status(i) for i in self.indexers]
        return StatusResult(
            version=__version__, model=engine.get("model") or (self.effective_model_settings().path or "default"),
            engine=engine["state"], device=engine.get("device"), dtype=engine.get("dtype"),
            window=engine.get("window"), context_tokens=engine.get("contextTokens"), indexing=self.indexing_state,
            roots=[str(r) for r in self.roots], files=sum(int(d.get("files", 0)) for d in details),
            chunks=sum(int(d.get("chunks", 0)) for d in details),
            memory_tokens=sum(int(d.get("memoryTokens", d.get("memory_tokens", 0))) for d in details),
            documents=len(self.documents), pending=engine.get("pending", 0), running=engine.get("running"),
            requests=engine.get("requests", {}),
            last_timings=engine.get("lastTimings", {}), settings=to_camel_dict(self.settings), details=details,
            error=engine.get("error") or self.indexing_error)


def _indexer_status(indexer: Any) -> dict[str, Any]:
    """The indexer's status() as plain JSON (it may hold dataclasses and paths)."""
    def plain(value: Any) -> Any:
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)
    try:
        return json.loads(json.dumps(indexer.status(), default=plain))
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)}


def _index_summary(indexer: Any) -> str:
    d = _indexer_status(indexer)
    return f"{d.get('files', '?')} files, {d.get('chunks', '?')} chunks"


def engine_options(s: Settings) -> EngineOptions:
    return EngineOptions(mode=s.completion.mode, max_tokens=s.completion.max_tokens, answer_max_tokens=s.ask.max_tokens,
                         context_tokens=s.completion.context_tokens, memory=s.memory.enabled)


def default_engine_factory(model: ModelSettings, options: EngineOptions) -> Engine:
    return Engine.load(model.path, model.device, model.dtype, options=options, decode_dtype=model.decode_dtype)


def default_indexer_factory(root: Path, engine: Engine, settings: Settings) -> Any:
    """indexer.pipeline.Indexer for `root`, sharing the engine's model (its bank feeds completions)."""
    from indexer.pipeline import Indexer

    if engine.model_dir is None:
        raise ValueError("indexing needs the model's checkpoint folder (Engine.model_dir)")
    return Indexer.open(root, engine.model, engine.tokenizer, engine.model_dir,
                        budget_tokens=settings.memory.budget_tokens or None)


# -- TCP: one session per connection -----------------------------------------------------------------------

class TcpSessionProtocol(LongLlamaProtocol):
    """A connection's protocol: `exit` ends this session and its connection, not the process."""

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any):
        if (user_handler := self.fm.features.get(types.EXIT)) is not None:
            yield user_handler, args, None
        # Close the connection: serve_tcp's loop sees EOF and ends the session (end_session cancels the
        # pending requests; not from here, this notification's own future is among them).
        writer, self.writer = self.writer, _Discard()
        if self._server._stop_event is not None:
            self._server._stop_event.set()
        if writer is not None:
            writer.close()


class _Discard:
    """The writer of a session whose connection is gone."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def serve_tcp(host: str, port: int, new_session: Callable[[], LongLlamaServer], shared: SharedServices,
              max_sessions: int = MAX_TCP_SESSIONS, on_listening: Callable[[list[Any]], None] | None = None) -> None:
    """Serve LSP over TCP, one session (`new_session()`, bound to `shared`) per connection, until the
    process is stopped. Each session authenticates on its own (its token check, its initialize)."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(shared.sessions) >= max_sessions:
            logger.warning("refused a TCP client from %s: %d sessions already", peer, max_sessions)
            writer.close()
            return
        session = new_session()
        CURRENT_SESSION.set(session)  # this task's context: its handlers' logs go to this client
        shared.sessions[session.session_id] = session
        session._stop_event = threading.Event()
        session.protocol.set_writer(writer)  # type: ignore[arg-type]
        logger.info("TCP session %d from %s (%d open)", session.session_id, peer, len(shared.sessions))
        try:
            await run_async(stop_event=session._stop_event, reader=reader, protocol=session.protocol, logger=logger,
                            error_handler=session.report_server_error)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            logger.info("TCP session %d: connection lost (%s)", session.session_id, type(exc).__name__)
        finally:
            shared.sessions.pop(session.session_id, None)
            session.end_session()
            writer.close()
            logger.info("TCP session %d ended (%d open)", session.session_id, len(shared.sessions))

    async def serve() -> None:
        server = await asyncio.start_server(connection, host, port)
        if on_listening is not None:
            on_listening(server.sockets)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except (KeyboardInterrupt, asyncio.CancelledError):
        logger.debug("TCP server stopped")
    finally:
        shared.close()


# -- logging --------------------------------------------------------------------------------------------

_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
_OUR_LOGGERS = ("longllama_lsp", "indexer")


def apply_log_level(level: str) -> None:
    for name in _OUR_LOGGERS:
        logging.getLogger(name).setLevel(_LEVELS.get(level, logging.INFO))


class _LspLogHandler(logging.Handler):
    """Our log records as window/logMessage (pygls' own loggers are not forwarded: they log every send)."""

    KINDS = {logging.ERROR: types.MessageType.Error, logging.WARNING: types.MessageType.Warning,
             logging.INFO: types.MessageType.Info}

    # The sessions that receive records: a record logged inside a session's handler (CURRENT_SESSION)
    # goes to that session only, any other (worker and indexer threads) to all of them.
    sessions: weakref.WeakSet = weakref.WeakSet()

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    @classmethod
    def install(cls, server: LongLlamaServer) -> None:
        if not server.shared.multi:
            cls.sessions.clear()  # one session at a time: the newest (as before)
        cls.sessions.add(server)
        for name in _OUR_LOGGERS:
            log = logging.getLogger(name)
            if not any(isinstance(h, cls) for h in log.handlers):
                log.handlers = [*log.handlers, cls()]

    @classmethod
    def uninstall(cls, server: LongLlamaServer) -> None:
        cls.sessions.discard(server)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            from indexer.secrets import redact  # the editor's log is a log too: no credentials in it

            kind = self.KINDS.get(record.levelno, types.MessageType.Log)
            current = CURRENT_SESSION.get()
            if current is None:
                targets = list(self.sessions)
            else:  # a session's own record: to it alone, and nowhere once it ended
                targets = [current] if current in self.sessions else []
            for server in targets:
                server.call_soon(server.window_log_message,
                                 types.LogMessageParams(type=kind, message=redact(self.format(record))))
        except Exception:  # noqa: BLE001 - logging must never break the server
            pass
        finally:
            self._local.busy = False
