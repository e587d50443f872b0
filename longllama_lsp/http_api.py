"""`longllama serve --http`: an OpenAI-compatible HTTP API with the served repository in memory.

    GET  /v1/models              the one model this server runs
    POST /v1/completions         prompt (+ suffix): code completion, `stream` as server-sent events; a prompt
                                 the client wrapped in FIM markers itself is split back (fim.split_fim_text)
    POST /v1/chat/completions    messages: an answer, `stream` as server-sent events

Editor extensions that speak this API (Continue, llm.nvim, ...) get the repository memory of
`--repo` without a plugin of ours. The process holds one Workspace: one engine (its worker thread is
the model's one owner; every request is queued there) and one indexer for the served root, indexed
in the background after the model loads and then watched; requests meanwhile use what is indexed.

Every request needs `Authorization: Bearer <token>` (auth.py: $LONGLLAMA_TOKEN, else --token-file,
else a fresh token published in this user's private server record, protocol "http"). Every local user
can connect, so a connection is *pending* until a request of it carries the token, with the policy
of tcp.TcpLimits (`HttpLimits`): at most max_pending pending connections (a newcomer past the cap
closes the oldest), each closed unless authenticated within pre_auth_s of its accept, whatever
trickles in; only then does it take one of max_connections slots. Bodies are
JSON with a Content-Length no larger than MAX_BODY_BYTES, checked before a byte is read. Errors are
OpenAI-style objects ({"error": {"message", "type", "param", "code"}}) with a 4xx status, and the
server keeps serving. A client that disconnects while its request is queued or running cancels it
in the engine (checked every POLL_S), so an editor that aborts stale completions frees the worker.

Decoding is greedy: temperature, top_p and seed are accepted and ignored; n must be 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .auth import AuthError, ServerRecord, publish, server_token, tokens_match, unpublish
from .fim import split_fim_text
from .worker import Cancelled

if TYPE_CHECKING:
    from .engine import Engine
    from .worker import Request
    from .workspace import RepositoryFactory, Workspace

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20  # a 4M-character buffer (service.MAX_DOCUMENT_CHARS) of mostly ASCII, and JSON around it
MAX_CONNECTIONS = 32  # concurrent authenticated connections; more get 503 (each holds a thread)
SOCKET_TIMEOUT_S = 60  # an authenticated client silent this long mid-request (or idle between requests) is dropped
POLL_S = 0.05  # how often a waiting handler looks for a disconnected client
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_MESSAGES = 256
HTTP_USER = "http"  # the workspace user that holds the served root


class ApiError(Exception):
    """A request the API refuses: an HTTP status and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request bodies (typed; unknown fields are ignored, as OpenAI clients send many) -----------------------

@dataclass
class CompletionRequest:
    prompt: str
    suffix: str = ""
    max_tokens: int | None = None
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    mode: str = "block"  # an extension: "line" ends at the end of the line
    user: str | None = None


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False
    user: str | None = None

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def _typed(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        wanted = " or ".join(k.__name__ for k in _tuple(kinds))
        raise ApiError(400, f"'{name}' must be {wanted}, got {type(value).__name__}", param=name)
    return value


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """The fields both endpoints share, checked."""
    _typed(body, "model", str)
    if _typed(body, "n", int, 1) != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _typed(body, name, (int, float))
    max_tokens = _typed(body, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be at least 1", param="max_tokens")
    stop = _typed(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    return {"max_tokens": max_tokens, "stream": _typed(body, "stream", bool, False), "stop": stop,
            "user": _typed(body, "user", str)}


def parse_completion(body: Any) -> CompletionRequest:
    body = _object(body)
    prompt = _typed(body, "prompt", (str, list))
    if isinstance(prompt, list):  # a batch: one prompt only (n = 1, greedy)
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(400, "'prompt' must be a string or a list of one string", param="prompt")
        prompt = prompt[0]
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    if _typed(body, "echo", bool, False) or body.get("logprobs") is not None or body.get("best_of") not in (None, 1):
        raise ApiError(400, "echo, logprobs and best_of are not supported", param="echo")
    mode = _typed(body, "mode", str, "block")
    if mode not in ("line", "block"):
        raise ApiError(400, "'mode' must be 'line' or 'block'", param="mode")
    suffix = _typed(body, "suffix", str, "")
    # Continue's FIM templates, llm.nvim with fim.enabled. A client that sends a suffix wrapped nothing:
    # markers in its prompt are the buffer's text (e.g. a FIM table in the code being edited).
    wrapped = None if suffix else split_fim_text(prompt)
    if wrapped is not None:
        prompt, suffix = wrapped.prefix, wrapped.suffix
    return CompletionRequest(prompt, suffix, mode=mode, **_common(body))


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "user"}


def parse_chat(body: Any) -> ChatRequest:
    body = _object(body)
    raw = _typed(body, "messages", list)
    if not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    if len(raw) > MAX_MESSAGES:
        raise ApiError(400, f"at most {MAX_MESSAGES} messages", param="messages")
    messages = [_message(m, i) for i, m in enumerate(raw)]
    users = [m for m in messages if m["role"] == "user"]
    if not users or not users[-1]["content"].strip():
        raise ApiError(400, "'messages' needs a user message with text, the last one", param="messages")
    common = _common(body)
    max_tokens = _typed(body, "max_completion_tokens", int, common["max_tokens"])
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "'max_completion_tokens' must be at least 1", param="max_completion_tokens")
    options = _typed(body, "stream_options", dict, {})
    return ChatRequest(messages, **{**common, "max_tokens": max_tokens},
                       include_usage=bool(options.get("include_usage")))


def _message(m: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
        raise ApiError(400, f"{param} must be an object with a role in {sorted(ROLES)}", param=param)
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{param}.content: only text parts are supported", param=param)
        content = "".join(p["text"] for p in content)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string or a list of text parts", param=param)
    return {"role": ROLES[m["role"]], "content": content}


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


# -- stop sequences ---------------------------------------------------------------------------------------

class StopScan:
    """Streams text up to the first stop sequence, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, delta: str) -> str:
        """The text that is safe to send now."""
        if self.stopped:
            return ""
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.text = True, self.text[:min(hits)]
            end = len(self.text)
        else:
            end = len(self.text) - max((_overlap(self.text, s) for s in self.stops), default=0)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    scan = StopScan(stops)
    return scan.feed(text) + scan.flush(), scan.stopped


# -- the API ----------------------------------------------------------------------------------------------

class Api:
    """What a request needs: the workspace (engine + served root), the token, the model's name."""

    def __init__(self, workspace: Workspace, token: str, model_id: str):
        self.workspace, self.token, self.model_id = workspace, token, model_id
        self._ids = itertools.count(1)

    @property
    def engine(self) -> Engine:
        return self.workspace.engine

    def key(self, user: str | None) -> Hashable:
        """The engine's newest-wins and prefix-reuse key: per `user` when the client names one (an
        editor's next completion then supersedes its last and reuses its prefix), else per request."""
        return ("http", "user", user) if user else ("http", next(self._ids))


def finish_reason(stop_reason: str, stopped: bool = False) -> str:
    return "length" if stop_reason == "max_tokens" and not stopped else "stop"


class Handler(BaseHTTPRequestHandler):
    """One connection (HTTP/1.1 keep-alive); see the module docstring for the rules."""

    protocol_version = "HTTP/1.1"
    server_version = "longllama"
    timeout = SOCKET_TIMEOUT_S
    server: ApiServer

    # -- plumbing ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_OPTIONS(self) -> None:  # no CORS: a web page may not call this API (it could not send the token anyway)
        self._serve("OPTIONS")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    def _serve(self, method: str) -> None:
        self._headers_sent = False  # per request: a keep-alive connection's handler serves several
        # A body still on the wire after an error reply: the connection cannot carry another request.
        self._body_pending = self.headers.get("Content-Length") not in (None, "0") or \
            bool(self.headers.get("Transfer-Encoding"))
        try:
            self._authorize()
            if not self.server.authenticated(self.request):
                self.close_connection = True
                raise ApiError(503, f"the server has {self.server.limits.max_connections} connections open",
                               type="server_error", code="busy")
            route = ROUTES.get(self.path.split("?", 1)[0])
            if route is None:
                raise ApiError(404, f"no route {self.path.split('?', 1)[0]!r}: this server has "
                               "/v1/models, /v1/completions and /v1/chat/completions", code="not_found")
            wanted, handler = route
            if method != wanted:
                raise ApiError(405, f"{self.path} takes {wanted}", code="method_not_allowed")
            handler(self, self._read_json() if method == "POST" else None)
        except ApiError as exc:
            self._reply_error(exc)
        except (ConnectionError, TimeoutError) as exc:
            logger.debug("client %s gone: %s", self.address_string(), type(exc).__name__)
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - one request fails, the server keeps serving
            logger.exception("request %s %s failed", method, self.path)
            self._reply_error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def _authorize(self) -> None:
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not tokens_match(given.strip(), self.server.api.token):
            raise ApiError(401, "missing or wrong token: send 'Authorization: Bearer <token>' (the server's "
                           "$LONGLLAMA_TOKEN, --token-file, or its server record)", type="authentication_error",
                           code="invalid_api_key")

    def _read_json(self) -> Any:
        """The body as JSON; its size is checked against MAX_BODY_BYTES before a byte is read."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length, not Transfer-Encoding")
        value = self.headers.get("Content-Length")
        if value is None:
            raise ApiError(411, "a Content-Length header is required")
        n = int(value) if value.isascii() and value.isdigit() else -1
        if n < 0:
            raise ApiError(400, "Content-Length must be a non-negative integer")
        if n > MAX_BODY_BYTES:
            raise ApiError(413, f"body of {n} bytes is larger than the limit of {MAX_BODY_BYTES}",
                           code="body_too_large")
        data = self.rfile.read(n)
        self._body_pending = False
        if len(data) < n:
            raise ConnectionError("the body ended early")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply") from None

    def _reply_error(self, exc: ApiError) -> None:
        if self._body_pending:
            self.close_connection = True
        extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if self._headers_sent:  # mid-stream: an error event, then the end of the stream
            self._event(exc.body())
            self._end_stream()
            return
        self._reply_json(exc.status, exc.body(), extra)

    def _reply_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._headers_sent = True

    def _event(self, body: Any) -> None:
        self._chunk(f"data: {json.dumps(body)}\n\n".encode())

    def _end_stream(self) -> None:
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client closed its end (readable with nothing to read). Bytes of a pipelined
        next request are left in place."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def wait(self, req: Request) -> Any:
        """The request's result; cancelled in the engine if the client disconnects meanwhile."""
        while True:
            try:
                return req.future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                if self.client_gone():
                    req.cancel()
                    raise ConnectionAbortedError("client disconnected; request cancelled") from None

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": f"{kind}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.server.api.model_id}

    # -- routes -----------------------------------------------------------------------------------

    def models(self, _body: None) -> None:
        self._reply_json(200, {"object": "list", "data": [
            {"id": self.server.api.model_id, "object": "model", "created": 0, "owned_by": "longllama"}]})

    def completions(self, body: Any) -> None:
        r = parse_completion(body)
        api = self.server.api
        engine = _ready(api.engine)
        try:
            req = engine.submit_complete(r.prompt + r.suffix, len(r.prompt), mode=r.mode, max_tokens=r.max_tokens,
                                         key=api.key(r.user), sources=False)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        try:
            done = self.wait(req)
            text, stopped = cut_at_stop(done.text, r.stop)
            reason = finish_reason(done.stop_reason, stopped)
            usage = _usage(done.prompt_tokens, done.generated_tokens, done.memory_tokens)
        except CANCELLED:  # superseded by this user's next request: nothing to show
            text, reason, usage = "", "stop", _usage(0, 0, 0)
        except ValueError as exc:  # the engine's word on a request it cannot serve
            raise ApiError(400, str(exc)) from None
        head = {**self.head("cmpl"), "object": "text_completion"}
        if not r.stream:
            self._reply_json(200, {**head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                        "finish_reason": reason}], "usage": usage})
            return
        self._start_stream()  # the engine completes in one piece: one text event, then the end
        for piece, end in ((text, None), ("", reason)):
            self._event({**head, "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": end}]})
        self._end_stream()

    def chat_completions(self, body: Any) -> None:
        r = parse_chat(body)
        api = self.server.api
        engine = _ready(api.engine)
        deltas: queue.SimpleQueue[str] = queue.SimpleQueue()
        try:
            req = engine.submit_answer(r.question, on_token=deltas.put, messages=r.messages,
                                       max_tokens=r.max_tokens, key=api.key(r.user))
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        scan = StopScan(r.stop)
        head = {**self.head("chatcmpl"), "object": "chat.completion.chunk"}

        def emit(delta: dict[str, Any], reason: str | None = None) -> None:
            self._event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})

        if r.stream:
            self._start_stream()
            emit({"role": "assistant", "content": ""})
        send = (lambda text: emit({"content": text})) if r.stream else (lambda text: None)
        answer = self._pump(req, deltas, scan, send)
        text = (scan.text if r.stream else scan.text.strip())
        generated = answer.generated_tokens if answer is not None else len(engine.tokenizer(text)["input_ids"])
        reason = finish_reason(answer.stop_reason if answer is not None else "stop", scan.stopped)
        usage = _usage(answer.prompt_tokens, generated, answer.memory_tokens) if answer is not None \
            else _usage(0, generated, 0)
        if not r.stream:
            self._reply_json(200, {**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": usage})
            return
        if tail := scan.flush():
            send(tail)
        emit({}, reason)
        if r.include_usage:
            self._event({**head, "choices": [], "usage": usage})
        self._end_stream()

    def _pump(self, req: Request, deltas: queue.SimpleQueue, scan: StopScan,
              send: Callable[[str], None]) -> Any:
        """Pass the answer's text to `send` as it arrives, up to a stop sequence (which cancels the rest
        of the generation); the Answer, or None when a stop sequence or a newer request ended it."""
        while True:
            try:
                delta = deltas.get(timeout=POLL_S)
            except queue.Empty:
                if req.future.done():
                    break
                if self.client_gone():
                    req.cancel()
                    raise ConnectionAbortedError("client disconnected; request cancelled") from None
                continue
            try:
                if text := scan.feed(delta):
                    send(text)
            except (ConnectionError, TimeoutError):
                req.cancel()
                raise
            if scan.stopped:
                req.cancel()
        while not deltas.empty():
            scan.feed(deltas.get())
        try:
            return req.result()
        except CANCELLED:
            return None
        except ValueError as exc:  # the engine's word on a request it cannot serve
            raise ApiError(400, str(exc)) from None


CANCELLED = (Cancelled, concurrent.futures.CancelledError)  # stopped while running, or while queued

ROUTES: dict[str, tuple[str, Callable[[Handler, Any], None]]] = {
    "/v1/models": ("GET", Handler.models),
    "/v1/completions": ("POST", Handler.completions),
    "/v1/chat/completions": ("POST", Handler.chat_completions),
}


def _ready(engine: Engine) -> Engine:
    try:
        engine.wait_ready(timeout=0)
    except TimeoutError:
        raise ApiError(503, "the model is still loading", type="server_error", code="loading") from None
    except Exception as exc:  # noqa: BLE001
        raise ApiError(503, f"the model is unavailable: {exc}", type="server_error") from None
    return engine


def _usage(prompt: int, completion: int, memory: int) -> dict[str, int]:
    """OpenAI's usage, plus `memory_tokens`: what the memory layers attended to (repository + buffer)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "memory_tokens": memory}


@dataclass(frozen=True)
class HttpLimits:
    """tcp.TcpLimits' policy for HTTP connections (see the module docstring)."""

    max_connections: int = MAX_CONNECTIONS  # authenticated connections
    max_pending: int = 8  # connections that have not sent a request with the token yet
    pre_auth_s: float = 10.0  # from accept to a request line + headers with the token, in all


class ApiServer(ThreadingHTTPServer):
    """A thread per connection: at most `max_pending` waiting to authenticate, `max_connections` after."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: Api, limits: HttpLimits = HttpLimits()):
        self.api, self.limits = api, limits
        self._lock = threading.Lock()
        self._pending: OrderedDict[socket.socket, float] = OrderedDict()  # -> accept time (monotonic)
        self._active: set[socket.socket] = set()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._pending) >= self.limits.max_pending:  # the oldest newcomer goes, never a client
                oldest, _ = self._pending.popitem(last=False)
                logger.warning("dropped a pending HTTP connection: %d others waited to authenticate",
                               self.limits.max_pending)
                _hang_up(oldest)
            self._pending[request] = time.monotonic()
        super().process_request(request, client_address)

    def authenticated(self, request: socket.socket) -> bool:
        """A request of this connection carried the token: it leaves the pending ones for a slot. False
        when no slot is free, or when it was closed meanwhile (evicted, too late)."""
        with self._lock:
            if request in self._active:
                return True
            if self._pending.pop(request, None) is None or len(self._active) >= self.limits.max_connections:
                logger.warning("refused an HTTP client: %d connections open", len(self._active))
                return False
            self._active.add(request)
            return True

    def service_actions(self) -> None:
        """serve_forever's loop (every poll interval): close pending connections past their deadline,
        however slowly their bytes trickled in (the socket timeout counts per read)."""
        super().service_actions()
        late = time.monotonic() - self.limits.pre_auth_s
        with self._lock:
            expired = [r for r, accepted in self._pending.items() if accepted < late]
            for r in expired:
                del self._pending[r]
        for r in expired:
            logger.warning("closed an HTTP connection: not authenticated in %.0f s", self.limits.pre_auth_s)
            _hang_up(r)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._pending.pop(request, None)
                self._active.discard(request)


def _hang_up(request: socket.socket) -> None:
    """End a connection another thread serves: its blocked read returns EOF and that thread closes
    the socket (closing it here could hand its descriptor number to a new connection mid-read)."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- the command ------------------------------------------------------------------------------------------

def index_in_background(workspace: Workspace, root: Path) -> threading.Thread | None:
    """Open `root` in the workspace, then index it and watch it on a thread (requests meanwhile use
    what is indexed so far). None when the workspace does not index."""
    if workspace.open_repository is None:
        return None
    try:
        repo = workspace.open(root, HTTP_USER)
    except Exception:  # noqa: BLE001 - e.g. an unreadable .longllama/: serve without repository memory
        logger.exception("cannot index %s: answering without its memory", root)
        return None

    def run() -> None:
        try:
            workspace.index(repo, progress=lambda p: logger.debug("indexing %s: %s %d/%d", root, p.phase, p.done,
                                                                   p.total))
            workspace.watch(repo)
            logger.info("indexed and watching %s", root)
        except Exception:  # noqa: BLE001 - the API keeps answering without (some) memory
            logger.exception("indexing %s failed", root)
    thread = threading.Thread(target=run, name="longllama-http-index", daemon=True)
    thread.start()
    return thread


def model_id(engine: Engine) -> str:
    return Path(engine.name).name if engine.name else "longllama"


def serve_http(args: argparse.Namespace, repository_factory: RepositoryFactory | None) -> int:
    """Load the model, listen, index --repo in the background, serve until stopped."""
    from .cli import repository_problem, shown, shown_lines
    from .engine import Engine, EngineOptions
    from .workspace import Workspace, untrained_memory_warning

    try:
        token, generated = server_token(args.token_file)
    except AuthError as exc:
        print(f"longllama serve: error: {shown_lines(str(exc))}", file=sys.stderr)
        return 2
    repo = args.repo or "."
    if problem := repository_problem(repo):
        print(f"longllama serve: error: {shown_lines(problem)}", file=sys.stderr)
        return 2
    root = Path(repo).resolve()
    engine = Engine.load(args.model, args.device, args.dtype, options=EngineOptions(), decode_dtype=args.decode_dtype)
    workspace = Workspace(engine, repository_factory)
    record: ServerRecord | None = None
    try:
        engine.wait_ready()
        if warning := untrained_memory_warning(engine.model_dir):
            logger.warning("%s", warning)
        server = ApiServer((args.host, args.port), Api(workspace, token, model_id(engine)))
        host, port = server.server_address[:2]
        index_in_background(workspace, root)
        if generated:
            record = ServerRecord(os.getpid(), host, port, token, protocol="http", roots=[str(root)])
            publish(record)
        where = f"[{host}]" if ":" in host else host
        print(f"longllama: OpenAI-compatible API on http://{where}:{port}/v1 (model {shown(model_id(engine))}, "
              f"repository {shown(root)})", file=sys.stderr, flush=True)
        if generated:
            print(f"longllama: token in {shown(record.path)}" + ("" if args.print_token else " (--print-token shows it)"),
                  file=sys.stderr, flush=True)
            if args.print_token:
                print(f"longllama: token {token}", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            server.serve_forever(poll_interval=0.5)
        except (KeyboardInterrupt, SystemExit):
            logger.debug("HTTP server stopped")
        finally:
            server.server_close()
    finally:
        if record is not None:
            unpublish(record)
        workspace.close()
    return 0


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)
