"""One LSP session: its documents, settings, initialize/shutdown, and what the handlers in
server.py call: completion and ask (through the Engine, whose worker thread owns the model), status,
settings updates, and indexing of its workspace folders with work-done progress.

What a process holds once is in shared.py (`SharedServices`: the workspace, i.e. the engine and one
indexer per root). The engine loads after `initialized`; indexing starts once it is ready, and
completions use whatever is indexed so far. Over TCP (tcp.py) a session's completions are keyed by
(session, uri) in the engine, so editors do not supersede each other; a dropped connection cancels
that session's pending requests and releases its roots. Log forwarding is in logs.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.exceptions import (
    JsonRpcInvalidParams,
    JsonRpcParseError,
    JsonRpcServerError,
    JsonRpcServerNotInitialized,
)
from pygls.lsp.server import LanguageServer
from pygls.uris import from_fs_path, to_fs_path

from . import __version__
from .assembly import relative
from .documents import Document, Documents, PositionError, UnknownDocument
from .engine import Answer, Cancelled, Completion, Engine, Source
from .logs import LspLogHandler, apply_log_level
from .prompt import word_before
from .protocol import MODEL_UNAVAILABLE, AskResult, ReindexResult, SourceInfo, StatusResult
from .protocol import converter as wire_converter
from .repository import Progress, Repository
from .rpc import LongLlamaProtocol
from .settings import ModelSettings, Settings, parse_settings, to_camel_dict
from .shared import EngineFactory, SharedServices, engine_options
from .tcp import Discard, TcpSessionProtocol
from .workspace import RepositoryFactory, repository_status, summary_line, untrained_memory_warning

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 20_000
PROGRESS_EVERY_S = 0.2  # throttle $/progress reports


class LongLlamaServer(LanguageServer):
    """One LSP session (see the module docstring)."""

    protocol: LongLlamaProtocol

    def __init__(self, engine_factory: EngineFactory | None = None,
                 repository_factory: RepositoryFactory | None = None,
                 model_overrides: ModelSettings | None = None, shared: SharedServices | None = None):
        shared = shared or SharedServices(engine_factory, repository_factory, model_overrides)
        super().__init__("longllama-lsp", __version__,
                         protocol_cls=TcpSessionProtocol if shared.multi else LongLlamaProtocol, max_workers=4,
                         converter_factory=wire_converter,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.shared = shared
        self.session_id = shared.new_session_id()
        self.documents = Documents()
        self.settings = Settings()
        self.model_overrides = shared.model_overrides
        self.engine: Engine | None = None
        self.repositories: list[Repository] = []  # this session's roots, opened in the shared workspace
        self.indexing_state = "off" if shared.repository_factory is None else "waiting"
        self.indexing_error: str | None = None
        self.roots: list[Path] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._engine_ready: asyncio.Future | None = None
        self._problems: list[str] = []
        self._refused_roots: list[str] = []  # refused roots, said once the client is initialized
        self._tickets: dict[str, int] = {}
        self._supports_progress = False
        self._shown_errors: set[str] = set()
        self.ended = False

    def engine_key(self, uri: str) -> Hashable:
        """The engine's newest-wins and prefix-cache key of a document: per session when sessions share it."""
        return (self.session_id, uri) if self.shared.multi else uri

    # -- plumbing -----------------------------------------------------------------------------------

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
        self.settings, self._problems = parse_settings(params.initialization_options)
        apply_log_level(self.settings.log_level)
        folders = params.workspace_folders or []
        uris = [f.uri for f in folders] or [u for u in [params.root_uri] if u]
        if not uris and params.root_path:
            uris = [from_fs_path(params.root_path)]
        self.roots = self.accepted_roots(Path(p) for p in (to_fs_path(u) for u in uris) if p)
        window = params.capabilities.window
        self._supports_progress = bool(window and window.work_done_progress)

    def accepted_roots(self, roots: Iterable[Path]) -> list[Path]:
        """The workspace folders this session may index and read: all of them over stdio; over TCP
        only folders the server's user owns or that it was started with (`--allow-root`)."""
        accepted = []
        for root in roots:
            refusal = self.shared.root_refusal(root)
            if refusal is None:
                accepted.append(root.resolve())
            else:
                logger.warning("refused workspace folder %s: %s", root, refusal)
                self._refused_roots.append(f"longllama: workspace folder {root} refused: {refusal}")
        return accepted

    def memory_roots(self) -> frozenset[Path]:
        """The repositories this session's requests read: its own roots, never another session's."""
        return frozenset(self.roots)

    async def on_initialized(self) -> None:
        if self.ended or self._engine_ready is not None:
            return
        self.loop = asyncio.get_running_loop()
        LspLogHandler.install(self)
        for problem in self._problems:
            self.show(f"longllama: invalid setting {problem}")
        for refusal in self._refused_roots:
            self.show(refusal, types.MessageType.Error)
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
        if self.settings.indexing.enabled and self.indexes and not self.ended:
            await self.start_indexing()

    @property
    def indexes(self) -> bool:
        return self.shared.repository_factory is not None

    def warn_if_memory_untrained(self) -> None:
        """Untrained memory layers make completions worse (BENCHMARKS.md, issue 6): say so once."""
        warning = untrained_memory_warning(self.shared.workspace.engine.model_dir, "set memory.enabled = false")
        if self.settings.memory.enabled and warning is not None:
            self.show(f"longllama: {warning}", types.MessageType.Warning, once=True)

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
        LspLogHandler.uninstall(self)
        self.protocol.set_writer(Discard())  # replies to the cancelled requests go nowhere
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
        if self.settings.indexing.enabled != old.indexing.enabled and self.indexes:
            if self.settings.indexing.enabled:
                asyncio.ensure_future(self.start_indexing())
            else:
                self.stop_indexing()

    # -- indexing -------------------------------------------------------------------------------------

    async def start_indexing(self) -> None:
        """Open each workspace folder in the shared workspace (another session's root is joined), index
        what is not indexed yet with work-done progress, then watch it."""
        if self.engine is None or self.engine.state != "ready" or self.indexing_state == "indexing" or self.ended:
            return
        self.stop_indexing()
        self.indexing_state, self.indexing_error = "indexing", None
        shared, workspace = self.shared, self.shared.workspace
        shared.index_lock = shared.index_lock or asyncio.Lock()
        try:
            async with shared.index_lock:
                for root in self.roots:
                    if self.ended:
                        return
                    self.repositories.append(await self.loop.run_in_executor(
                        None, workspace.open, root, self.session_id, self.settings.memory.budget_tokens or None))
                    if self.ended:  # the connection dropped while the root opened: end_session released too early
                        workspace.release(self.session_id)
                    shared.roots_changed()
                for repo in list(self.repositories):
                    if workspace.needs_index(repo) and not self.ended:
                        await self._index_with_progress(repo)
                        if self.ended:
                            return  # its roots were released meanwhile
                        await self.loop.run_in_executor(None, workspace.watch, repo)
                    await self._say_if_read_only(repo)
            self.indexing_state = "watching" if self.repositories else "idle"
        except Exception as exc:  # noqa: BLE001 - completions keep working without (some) memory
            logger.exception("indexing failed")
            self.indexing_state, self.indexing_error = "error", str(exc)
            self.show(f"longllama: indexing failed: {exc}", types.MessageType.Error)

    async def _say_if_read_only(self, repo: Repository) -> None:
        """The editor says why this server does not index (workspace.open_indexer)."""
        state = (await self.loop.run_in_executor(None, repository_status, repo)).get("state")
        if state == "read-only":
            self.show(f"longllama: the index of {repo.root} is being written by another process (e.g. "
                      f"`longllama watch`); using it read-only: memory follows what that process indexes "
                      f"(open files are read as they are here), and this server indexes itself once that "
                      f"process stops", once=True)

    def stop_indexing(self) -> None:
        if self.shared.workspace is not None:
            self.shared.workspace.release(self.session_id)
            self.shared.roots_changed()
        self.repositories = []
        self.indexing_state = "off" if not self.settings.indexing.enabled else self.indexing_state

    async def _index_with_progress(self, repo: Repository) -> None:
        token = f"longllama-index-{uuid.uuid4()}"
        progress = self._supports_progress
        if progress:
            try:
                await asyncio.wait_for(self.work_done_progress.create_async(token), 10)
            except Exception:  # noqa: BLE001 - the client refused or never answered: index silently
                progress = False
        if progress:
            self.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                title="LongLLaMA: indexing", message=repo.root.name, percentage=0, cancellable=False))
        open_paths = [p for p in map(to_fs_path, self.documents.uris()) if p]  # their neighbourhood first
        report = _ProgressReporter(self, token if progress else None, repo.root, open_paths)
        try:
            await self.loop.run_in_executor(None, self.shared.workspace.index, repo, report, open_paths)
        finally:
            if progress:
                self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=summary_line(repo)))

    def touch(self, uri: str) -> None:
        """An opened file (and its folder) ranks first when the memory budget evicts chunks."""
        path = to_fs_path(uri)
        if path and self.shared.workspace is not None:
            self.shared.workspace.touch(path)

    def reindex(self) -> ReindexResult:
        if not self.indexes or not self.settings.indexing.enabled or self.engine is None \
                or self.engine.state != "ready":
            return ReindexResult(started=False)
        self.shared.workspace.reindex(self.session_id)
        asyncio.ensure_future(self.start_indexing())
        return ReindexResult(started=True, roots=[str(r) for r in self.roots])

    # -- completion and ask -----------------------------------------------------------------------------

    def document_and_offset(self, uri: str, position: types.Position) -> tuple[Document, int]:
        try:
            doc = self.documents.get(uri)
            offset = doc.offset_at(position, self.position_encoding)
        except (UnknownDocument, PositionError) as exc:
            raise JsonRpcInvalidParams(str(exc)) from None
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
                                     sources=sources, roots=self.memory_roots())
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
            memory=self.settings.memory.enabled, key=self.engine_key("longllama/ask"), roots=self.memory_roots()))
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
        details = [repository_status(r) for r in self.repositories]
        return StatusResult(
            version=__version__, model=engine.get("model") or (self.effective_model_settings().path or "default"),
            engine=engine["state"], device=engine.get("device"), dtype=engine.get("dtype"),
            window=engine.get("window"), context_tokens=engine.get("contextTokens"), indexing=self.indexing_state,
            roots=[str(r) for r in self.roots], files=sum(int(d.get("files", 0)) for d in details),
            chunks=sum(int(d.get("chunks", 0)) for d in details),
            memory_tokens=sum(int(d.get("memory_tokens", 0)) for d in details),
            documents=len(self.documents), pending=engine.get("pending", 0), running=engine.get("running"),
            requests=engine.get("requests", {}),
            last_timings=engine.get("lastTimings", {}), settings=to_camel_dict(self.settings), details=details,
            error=engine.get("error") or self.indexing_error)


class _ProgressReporter:
    """Indexing progress as $/progress reports (throttled) and debug log lines."""

    def __init__(self, session: LongLlamaServer, token: str | None, root: Path, open_paths: list[str]):
        self.session, self.token, self.root, self.last = session, token, root, 0.0
        self.open_names = [Path(p).name for p in open_paths if relative(p, root.resolve()) is not None]

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if p.phase != "ready" and now - self.last < PROGRESS_EVERY_S and p.done < p.total:
            return  # a 'ready' report is never throttled: it is the one the user waits for
        self.last = now
        if p.phase == "ready":
            text, pct = self._ready_text(p), None
        else:
            share = (0, 20) if p.phase == "scan" else (20, 80)  # scanning is cheap next to encoding
            pct = share[0] + (share[1] * p.done) // p.total if p.total else None
            unit = "files" if p.phase == "scan" else "chunks"
            text = f"{p.phase} {p.done}/{p.total} {unit} {p.message}".strip()
        if self.token is not None:
            self.session.call_soon(self.session.work_done_progress.report, self.token,
                                   types.WorkDoneProgressReport(message=text, percentage=pct))
        logger.debug("indexing %s: %s", self.root, text)

    def _ready_text(self, p: Progress) -> str:
        """'ready: a.py and its imports' (tier 'their imports'), 'ready: a.py' (tier 'open files')."""
        names = ", ".join(self.open_names) or "open files"
        tail = "" if p.message == "open files" else " and their imports" if len(self.open_names) > 1 \
            else " and its imports"
        rest = ", the rest continues" if p.done < p.total else ""
        return f"ready: {names}{tail} ({p.done}/{p.total} files{rest})"
