"""The language server's state and services: documents, settings, the engine, the indexers.

`LongLlamaServer` is pygls' LanguageServer with what the handlers in server.py call: completion and
ask (through the Engine, whose worker thread owns the model), status, settings updates, and
indexing of every workspace folder with work-done progress. The engine loads after `initialized`;
the indexers start once it is ready, and completions use whatever is indexed so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
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
from pygls.uris import from_fs_path, to_fs_path

from . import __version__
from .documents import Document, Documents, PositionError, UnknownDocument
from .engine import Answer, Cancelled, Completion, Engine, EngineOptions, Source
from .protocol import MODEL_UNAVAILABLE, UNAUTHORIZED, AskResult, ReindexResult, SourceInfo, StatusResult
from .protocol import converter as wire_converter
from .rpc import LongLlamaProtocol
from .settings import ModelSettings, Settings, parse_settings, to_camel_dict

logger = logging.getLogger(__name__)

MAX_DOCUMENT_CHARS = 4_000_000  # ~100k lines; larger buffers are refused rather than tokenized per keystroke
MAX_QUESTION_CHARS = 20_000
PROGRESS_EVERY_S = 0.2  # throttle $/progress reports

EngineFactory = Callable[[ModelSettings, EngineOptions], Engine]
IndexerFactory = Callable[[Path, Engine, Settings], Any]


class LongLlamaServer(LanguageServer):
    """The language server: documents, settings, the engine and the indexers (see module docstring)."""

    protocol: LongLlamaProtocol

    def __init__(self, engine_factory: EngineFactory | None = None, indexer_factory: IndexerFactory | None = None,
                 auth_token: str | None = None, model_overrides: ModelSettings | None = None):
        super().__init__("longllama-lsp", __version__, protocol_cls=LongLlamaProtocol, max_workers=4,
                         converter_factory=wire_converter,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.documents = Documents()
        self.settings = Settings()
        self.engine_factory = engine_factory or default_engine_factory
        self.indexer_factory = indexer_factory
        self.model_overrides = model_overrides or ModelSettings()
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

    def start_tcp(self, host: str, port: int) -> None:
        """pygls' TCP server, but one client at a time: pygls shares one protocol (and so one
        authenticated flag) between connections, so a second client could ride on the first one's token."""
        self._stop_event = stop_event = threading.Event()
        active: list[asyncio.StreamWriter] = []

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if active:
                logger.warning("refused a second TCP client while one is connected")
                writer.close()
                return
            active.append(writer)
            self.authenticated = self.auth_token is None
            self.protocol.initialize_received = False
            self.protocol.set_writer(writer)  # type: ignore[arg-type]
            try:
                await run_async(stop_event=stop_event, reader=reader, protocol=self.protocol, logger=logger,
                                error_handler=self.report_server_error)
            finally:
                active.clear()
            self.shutdown()  # as pygls: the session ends with its client

        async def serve() -> None:
            self._server = await asyncio.start_server(connection, host, port)
            async with self._server:
                await self._server.serve_forever()

        try:
            asyncio.run(serve())
        except asyncio.CancelledError:
            logger.debug("TCP server stopped")

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
        self.loop = asyncio.get_running_loop()
        _LspLogHandler.install(self)
        for problem in self._problems:
            self.show(f"longllama: invalid setting {problem}")
        self._engine_ready = self.loop.create_future()
        model = self.effective_model_settings()
        logger.info("loading model %s (device %s, dtype %s)", model.path or "(default)", model.device, model.dtype)
        self.engine = self.engine_factory(model, engine_options(self.settings))
        asyncio.ensure_future(self._after_load())

    async def _after_load(self) -> None:
        engine = self.engine
        try:
            await self.loop.run_in_executor(None, engine.wait_ready)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the server keeps answering
            self._engine_ready.set_exception(exc)
            self._engine_ready.exception()  # mark retrieved
            self.show(f"longllama: the model could not be loaded: {exc}", types.MessageType.Error)
            self.indexing_state = "off"
            return
        self._engine_ready.set_result(engine)
        logger.info("model ready: %s", engine.status())
        if self.settings.indexing.enabled and self.indexer_factory is not None:
            await self.start_indexing()

    def effective_model_settings(self) -> ModelSettings:
        s, o = self.settings.model, self.model_overrides
        return ModelSettings(path=o.path or s.path, device=o.device or s.device, dtype=o.dtype or s.dtype)

    def shutdown_all(self) -> None:
        self.stop_indexing()
        if self.engine is not None:
            self.engine.close()

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
        if self.engine is not None:
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
        """Create one indexer per workspace folder, index with work-done progress, then watch."""
        if self.engine is None or self.engine.state != "ready" or self.indexing_state == "indexing":
            return
        self.stop_indexing()
        self.indexing_state, self.indexing_error = "indexing", None
        try:
            for root in self.roots:
                indexer = await self.loop.run_in_executor(None, self.indexer_factory, root, self.engine, self.settings)
                self.indexers.append(indexer)
                self.engine.repositories.append(indexer)  # serve from what is indexed so far
            for indexer in list(self.indexers):
                await self._index_with_progress(indexer)
                await self.loop.run_in_executor(None, indexer.start_watching)
            self.indexing_state = "watching" if self.indexers else "idle"
        except Exception as exc:  # noqa: BLE001 - completions keep working without (some) memory
            logger.exception("indexing failed")
            self.indexing_state, self.indexing_error = "error", str(exc)
            self.show(f"longllama: indexing failed: {exc}", types.MessageType.Error)

    def stop_indexing(self) -> None:
        for indexer in self.indexers:
            try:
                (getattr(indexer, "close", None) or indexer.stop)()
            except Exception:  # noqa: BLE001
                logger.exception("stopping the indexer failed")
            if self.engine is not None and indexer in self.engine.repositories:
                self.engine.repositories.remove(indexer)
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

    async def complete(self, uri: str, position: types.Position,
                       automatic: bool = False) -> tuple[Completion | None, Document]:
        """One completion at `position` (None when superseded by a newer request for the document),
        and the document as it was when the request arrived: the position refers to that version."""
        doc, offset = self.document_and_offset(uri, position)
        snapshot = Document(uri, doc.text, doc.version, doc.language_id)
        text = doc.text
        ticket = self._tickets[uri] = self._tickets.get(uri, 0) + 1
        engine = await self.ready_engine(required=False)
        if engine is None:
            return None, snapshot
        if automatic and self.settings.completion.debounce_ms:
            await asyncio.sleep(self.settings.completion.debounce_ms / 1000)
        if self._tickets.get(uri) != ticket:
            return None, snapshot
        req = engine.submit_complete(text, offset, path=to_fs_path(uri) or uri, key=uri)
        return await self._await(req), snapshot

    def document_changed(self, uri: str) -> None:
        """A pending or running completion for `uri` is stale now: free the worker for the next one."""
        self._tickets[uri] = self._tickets.get(uri, 0) + 1
        if self.engine is not None:
            self.engine.cancel(uri)

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
        answer: Answer | None = await self._await(engine.submit_answer(question, document=document,
                                                                      max_tokens=max_tokens))
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
    return Engine.load(model.path, model.device, model.dtype, options=options)


def default_indexer_factory(root: Path, engine: Engine, settings: Settings) -> Any:
    """indexer.pipeline.Indexer for `root`, sharing the engine's model (its bank feeds completions)."""
    from indexer.pipeline import Indexer

    if engine.model_dir is None:
        raise ValueError("indexing needs the model's checkpoint folder (Engine.model_dir)")
    return Indexer.open(root, engine.model, engine.tokenizer, engine.model_dir,
                        budget_tokens=settings.memory.budget_tokens or None)


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

    def __init__(self, server: LongLlamaServer):
        super().__init__()
        self.server = server
        self._local = threading.local()

    @classmethod
    def install(cls, server: LongLlamaServer) -> None:
        for name in _OUR_LOGGERS:
            log = logging.getLogger(name)
            log.handlers = [h for h in log.handlers if not isinstance(h, cls)] + [cls(server)]

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            from indexer.secrets import redact  # the editor's log is a log too: no credentials in it

            kind = self.KINDS.get(record.levelno, types.MessageType.Log)
            self.server.call_soon(self.server.window_log_message,
                                  types.LogMessageParams(type=kind, message=redact(self.format(record))))
        except Exception:  # noqa: BLE001 - logging must never break the server
            pass
        finally:
            self._local.busy = False
