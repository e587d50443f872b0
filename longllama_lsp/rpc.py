"""The JSON-RPC layer under the language server: pygls 2.1.1's protocol, with its gaps closed.

- A request whose params fail to deserialize gets an InvalidParams (-32602) error reply. pygls
  raises out of `json.loads(body, object_hook=structure_message)` in `pygls.io_.run_async`, hands
  the exception to `report_server_error` and never answers, so the editor waits forever; JSON-RPC
  2.0 §5 requires a response to every request that has an id.
- A message without `"jsonrpc": "2.0"` is answered with InvalidRequest (-32600) instead of crashing
  `handle_message` on a dict.
- Requests before `initialize` get ServerNotInitialized (-32002). Over TCP the token is checked
  before a connection becomes a session (tcp.wait_for_initialize), so no message reaches this layer
  unauthenticated.
- Our custom methods (protocol.py) are structured and validated like LSP ones.
- didOpen/didChange/didClose update our own document store (documents.py: LSP line breaks, limits
  checked as text arrives).

The server side it talks to (`_server`) provides `documents`, `position_encoding` and `show()`.
"""

from __future__ import annotations

import logging
from typing import Any

import cattrs
from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcServerNotInitialized,
)
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import RPCRequest
from pygls.protocol.language_server import lsp_method

from .documents import DocumentLimit, UnknownDocument
from .protocol import METHOD_TO_TYPES

logger = logging.getLogger(__name__)


class _Rejected:
    """What structure_message returns for a message it already answered with an error."""

    jsonrpc = "rejected"


REJECTED = _Rejected()


class LongLlamaProtocol(LanguageServerProtocol):
    """pygls' LSP protocol plus our message types, error replies, initialize gate and document store."""

    _server: Any

    def __init__(self, server: Any, converter: cattrs.Converter):
        super().__init__(server, converter)
        self.initialize_received = False

    def get_message_type(self, method: str) -> type | None:
        custom = METHOD_TO_TYPES.get(method)
        return custom[0] if custom else super().get_message_type(method)

    def get_result_type(self, method: str) -> type | None:
        custom = METHOD_TO_TYPES.get(method)
        return custom[1] if custom else super().get_result_type(method)

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if "jsonrpc" not in data or "method" not in data or "id" not in data:
                raise  # a notification or a response: nobody to answer
            msg_id = data["id"] if isinstance(data["id"], (int, str)) else None
            detail = _validation_detail(exc.__cause__)
            error = JsonRpcInvalidParams(f"Invalid params for {data['method']!r}: {detail}") \
                if isinstance(exc, JsonRpcInvalidParams) else exc
            logger.warning("refused request %r (%s): %s", msg_id, data.get("method"), error.message)
            self._send_response(msg_id, error=error.to_response_error())
            return REJECTED

    def handle_message(self, message: Any) -> None:
        if message is REJECTED:
            return
        if isinstance(message, dict):  # no "jsonrpc" member: not a JSON-RPC 2.0 message
            if "id" in message and "method" in message:
                msg_id = message["id"] if isinstance(message["id"], (int, str)) else None
                self._send_response(msg_id, error=JsonRpcInvalidRequest(
                    'Invalid Request: "jsonrpc": "2.0" is missing').to_response_error())
            # Name the method only: the body may quote the user's code (secrets included).
            logger.warning("ignored a message that is not JSON-RPC 2.0 (method %.80r)", message.get("method"))
            return
        method = getattr(message, "method", None)
        if method == types.INITIALIZE:
            self.initialize_received = True
        elif method != types.EXIT and not self.initialize_received:
            if isinstance(message, RPCRequest):
                self._send_response(message.id, error=JsonRpcServerNotInitialized().to_response_error())
            return
        super().handle_message(message)

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        try:
            self._server.documents.open(params.text_document)
        except DocumentLimit as exc:
            self._refuse(exc)
            return
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        try:
            self._server.documents.change(params, self._server.position_encoding)
        except UnknownDocument as exc:
            logger.warning("didChange ignored: %s", exc)
            return
        except DocumentLimit as exc:
            self._refuse(exc)
            return
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        self._server.documents.close(params.text_document.uri)
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None


    def _refuse(self, exc: DocumentLimit) -> None:
        """A notification cannot be answered: the log and the editor (once per message) say why."""
        logger.warning("%s", exc)
        self._server.show(f"longllama: {exc}", once=True)


def _validation_detail(exc: BaseException | None) -> str:
    """cattrs' validation errors as '<problem> @ $.path; ...'."""
    if isinstance(exc, cattrs.ClassValidationError):
        return "; ".join(cattrs.transform_error(exc, path="$"))
    return str(exc) if exc else "cannot be deserialized"
