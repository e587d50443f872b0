"""LSP over TCP: one session per connection, all sharing one `SharedServices` (one model).

Each connection is its own LSP session (documents, initialize/shutdown, token check); `exit` ends
that session and its connection, not the process. A dropped connection cancels its session's
pending requests and releases its roots (`LongLlamaServer.end_session`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lsprotocol import types
from pygls.io_ import run_async
from pygls.protocol.language_server import lsp_method

from .logs import CURRENT_SESSION
from .rpc import LongLlamaProtocol
from .shared import SharedServices

if TYPE_CHECKING:
    from .service import LongLlamaServer

logger = logging.getLogger(__name__)

MAX_TCP_SESSIONS = 64  # concurrent connections; more are closed at once (each holds documents and caches)


class TcpSessionProtocol(LongLlamaProtocol):
    """A connection's protocol: `exit` ends this session and its connection, not the process."""

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any):
        if (user_handler := self.fm.features.get(types.EXIT)) is not None:
            yield user_handler, args, None
        # Close the connection: serve_tcp's loop sees EOF and ends the session (end_session cancels the
        # pending requests; not from here, this notification's own future is among them).
        writer, self.writer = self.writer, Discard()
        if self._server._stop_event is not None:
            self._server._stop_event.set()
        if writer is not None:
            writer.close()


class Discard:
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
