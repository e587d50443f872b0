"""Logging: levels of our loggers, redaction, and records forwarded to editors as window/logMessage."""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

from lsprotocol import types

if TYPE_CHECKING:
    from .service import LongLlamaServer

# The session whose handler is running (set per TCP connection task; tasks inherit it): its log
# records go to that editor only. Records from other threads (engine worker, indexer) go to all.
CURRENT_SESSION: contextvars.ContextVar[Any] = contextvars.ContextVar("longllama_session", default=None)

_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
_OUR_LOGGERS = ("longllama_lsp", "indexer")


def apply_log_level(level: str) -> None:
    for name in _OUR_LOGGERS:
        logging.getLogger(name).setLevel(_LEVELS.get(level, logging.INFO))


class LspLogHandler(logging.Handler):
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
            if not targets:
                return
            params = types.LogMessageParams(type=kind, message=redact(self.format(record)))  # once: ~0.1-0.3 ms
            for server in targets:
                server.call_soon(server.window_log_message, params)
        except Exception:  # noqa: BLE001 - logging must never break the server
            pass
        finally:
            self._local.busy = False


def setup_logging(log_file: str | None, verbose: bool = False) -> None:
    handler = logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("pygls").setLevel(logging.WARNING)  # it logs every message body at INFO
    apply_log_level("debug" if verbose else "info")


class RedactingFormatter(logging.Formatter):
    """Masks credentials (indexer.secrets patterns) in every log line, tracebacks included: messages
    and exceptions can quote the user's buffers or requests (house rule: secrets never reach the logs).
    Control characters show escaped (cli.shown_lines): a repository's file names reach these lines, and
    the server's stderr is often a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        from indexer.secrets import redact

        from .cli import shown_lines

        return shown_lines(redact(super().format(record)))
