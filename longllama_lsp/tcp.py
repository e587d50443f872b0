"""LSP over TCP: one session per connection, all sharing one `SharedServices` (one model).

Every local user can connect to a loopback port, so a connection is *pending* until its first
request, `initialize`, carries the server's token (`initializationOptions.token`, auth.py); only
then does it become a session. The two stages have separate caps and timeouts (`TcpLimits`), so
clients that never authenticate cannot take the slots of real editors:

    pending  (<= max_pending, each <= pre_initialize_s, messages <= max_initialize_bytes)
             a newcomer past the cap evicts the oldest pending connection, never a session
    session  (<= max_sessions, closed after idle_s without a message, messages <= max_message_bytes)

Message sizes are read from Content-Length before the body: a body over the limit is skipped
unread (a session is told why) and never parsed. Replies a client leaves unread are bounded too
(max_unread_bytes: past it the connection is closed). Each session is its own LSP session (documents,
initialize/shutdown); `exit` ends that session and its connection, not the process. A dropped
connection cancels its session's pending requests and releases its roots (`end_session`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.protocol.language_server import lsp_method

from .auth import tokens_match
from .framing import MAX_HEADER_BYTES, MAX_MESSAGE_BYTES, FrameError, FrameHeader, frame_message
from .logs import CURRENT_SESSION
from .protocol import UNAUTHORIZED
from .rpc import LongLlamaProtocol
from .shared import SharedServices

if TYPE_CHECKING:
    from .service import LongLlamaServer

logger = logging.getLogger(__name__)

NOT_INITIALIZED, SERVER_BUSY, PARSE_ERROR = -32002, -32000, -32700
PENDING_MESSAGES = 4  # requests a pending connection may send before initialize (each answered -32002)
DISCARD_CHUNK = 1 << 16


@dataclass(frozen=True)
class TcpLimits:
    """See the module docstring; RELIABILITY.md has what was tried against them."""

    max_sessions: int = 64  # authenticated sessions (each holds documents and caches)
    max_pending: int = 8  # connections that have not sent a valid initialize yet
    pre_initialize_s: float = 10.0
    idle_s: float = 3600.0  # an editor left open over lunch keeps its session; a dead socket does not
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_initialize_bytes: int = 64 << 10
    max_header_bytes: int = MAX_HEADER_BYTES  # one header line; longer ends the connection
    # Replies the client has not read yet, beyond the kernel's buffers: a client that keeps sending
    # requests and never reads would grow them without end. Past this the connection is closed.
    max_unread_bytes: int = 64 << 20


class TooLarge(Exception):
    """A frame whose Content-Length is over the limit; its body was skipped unread."""

    def __init__(self, length: int, limit: int):
        super().__init__(f"a message of {length} bytes was dropped unread (limit {limit})")


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """The body of the next frame, or None at end of input. Headers are checked before the body is read."""
    header = FrameHeader()
    while True:
        try:
            line = await reader.readline()
        except ValueError as exc:  # a header line over the reader's limit
            raise FrameError(f"header line too long: {exc}") from None
        if not line.endswith(b"\n"):
            return None  # end of input (possibly mid-header)
        if header.feed(line):
            break
    length = header.length
    assert length is not None
    if length > max_bytes:
        left = length
        while left:  # skipped in small pieces: the bytes are never held
            piece = await reader.read(min(left, DISCARD_CHUNK))
            if not piece:
                return None
            left -= len(piece)
        raise TooLarge(length, max_bytes)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return None


async def reply_error(writer: asyncio.StreamWriter, msg_id: Any, code: int, message: str) -> None:
    msg_id = msg_id if isinstance(msg_id, (int, str)) else None
    writer.write(frame_message({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}))
    await writer.drain()


async def wait_for_initialize(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str,
                              limits: TcpLimits) -> bytes | None:
    """The body of an `initialize` with the right token; None when the connection is refused (the
    client was told why where it could be)."""
    for _ in range(PENDING_MESSAGES):
        body = await read_frame(reader, limits.max_initialize_bytes)
        if body is None:
            return None
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError):
            await reply_error(writer, None, PARSE_ERROR, "Parse error")
            return None
        if not isinstance(msg, dict):
            return None
        if msg.get("method") == types.INITIALIZE:
            params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
            options = params.get("initializationOptions")
            given = options.get("token") if isinstance(options, dict) else None
            if tokens_match(given, token):
                return body
            await reply_error(writer, msg.get("id"), UNAUTHORIZED, "unauthorized: initializationOptions.token does "
                              "not match the server's token ($LONGLLAMA_TOKEN, --token-file, or the server record)")
            return None
        if "id" in msg:
            await reply_error(writer, msg["id"], NOT_INITIALIZED, "send initialize (with the token) first")
    return None


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


class BoundedWriter:
    """A session's writer: closes the connection once the replies its client has not read pass
    `max_unread` bytes (the transport's buffer), instead of buffering them without end."""

    def __init__(self, writer: asyncio.StreamWriter, max_unread: int, session_id: int):
        self.writer, self.max_unread, self.session_id = writer, max_unread, session_id

    def write(self, data: bytes) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(data) > self.max_unread:
            logger.warning("TCP session %d: closed, its client left %d bytes of replies unread", self.session_id,
                           transport.get_write_buffer_size())
            transport.abort()
            return
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


class Discard:
    """The writer of a session whose connection is gone."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def deliver(session: LongLlamaServer, body: bytes) -> None:
    """One message into the session's protocol (as pygls' own loop does)."""
    try:
        session.protocol.handle_message(json.loads(body, object_hook=session.protocol.structure_message))
    except Exception as exc:  # noqa: BLE001 - one bad message never ends the session
        if not isinstance(exc, (ValueError, RecursionError)):
            logger.exception("unable to handle a message")
        session.report_server_error(exc, JsonRpcException)


def serve_tcp(host: str, port: int, new_session: Callable[[], LongLlamaServer], shared: SharedServices,
              token: str, limits: TcpLimits = TcpLimits(),
              on_listening: Callable[[list[Any]], None] | None = None) -> None:
    """Serve LSP over TCP, one session (`new_session()`, bound to `shared`) per authenticated
    connection, until the process is stopped."""
    pending: OrderedDict[int, asyncio.StreamWriter] = OrderedDict()

    async def authenticate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any) -> bytes | None:
        if len(pending) >= limits.max_pending:  # the oldest newcomer goes, not a session
            _, oldest = pending.popitem(last=False)
            logger.warning("dropped a pending TCP connection: %d others waited to authenticate", limits.max_pending)
            oldest.transport.abort()
        pending[id(writer)] = writer
        try:
            body = await asyncio.wait_for(wait_for_initialize(reader, writer, token, limits), limits.pre_initialize_s)
        except (TimeoutError, asyncio.TimeoutError):
            logger.warning("closed a TCP connection from %s: no valid initialize in %.0f s", peer,
                           limits.pre_initialize_s)
            return None
        except (FrameError, TooLarge) as exc:
            logger.warning("closed a TCP connection from %s before initialize: %s", peer, exc)
            return None
        finally:
            pending.pop(id(writer), None)
        if body is None:
            logger.warning("refused a TCP client from %s: no valid token", peer)
        elif len(shared.sessions) >= limits.max_sessions:
            logger.warning("refused a TCP client from %s: %d sessions already", peer, limits.max_sessions)
            await reply_error(writer, json.loads(body).get("id"), SERVER_BUSY,
                              f"the server has {limits.max_sessions} sessions already")
            return None
        return body

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            first = await authenticate(reader, writer, peer)
        except (ConnectionError, OSError):
            first = None
        if first is None:
            writer.transport.abort()
            return
        session = new_session()
        CURRENT_SESSION.set(session)  # this task's context: its handlers' logs go to this client
        shared.sessions[session.session_id] = session
        session._stop_event = threading.Event()
        session.protocol.set_writer(BoundedWriter(writer, limits.max_unread_bytes, session.session_id))  # type: ignore[arg-type]
        logger.info("TCP session %d from %s (%d open)", session.session_id, peer, len(shared.sessions))
        try:
            deliver(session, first)
            await serve_session(session, reader)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, FrameError) as exc:
            logger.info("TCP session %d: connection lost (%s)", session.session_id, exc or type(exc).__name__)
        finally:
            shared.sessions.pop(session.session_id, None)
            session.end_session()
            writer.close()
            logger.info("TCP session %d ended (%d open)", session.session_id, len(shared.sessions))

    async def serve_session(session: LongLlamaServer, reader: asyncio.StreamReader) -> None:
        while not session._stop_event.is_set():
            try:
                body = await asyncio.wait_for(read_frame(reader, limits.max_message_bytes), limits.idle_s)
            except (TimeoutError, asyncio.TimeoutError):
                logger.info("TCP session %d: idle for %.0f s, closed", session.session_id, limits.idle_s)
                return
            except TooLarge as exc:
                logger.warning("TCP session %d: %s", session.session_id, exc)
                session.show(f"longllama: {exc}")
                continue
            if body is None:
                return
            deliver(session, body)

    async def serve() -> None:
        server = await asyncio.start_server(connection, host, port, limit=limits.max_header_bytes)
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
