"""Custom LSP messages of longllama-lsp: params and results, camelCase on the wire.

Editors, tests and the README cite this file. Python attribute `text_document` is `textDocument`
in JSON (pygls' converter renames snake_case to camelCase for every attrs class).

Requests (client -> server)
    longllama/ask       AskParams     -> AskResult      answer a question from the repository memory
    longllama/status    StatusParams? -> StatusResult   model, device, indexing state, counts, settings

Commands (workspace/executeCommand)
    longllama.ask       arguments: [question] or [question, uri]   -> AskResult
    longllama.reindex   arguments: []                              -> ReindexResult

Initialization options: the settings tree of settings.py (see `settings_table()`), plus `token`
(string): over TCP, always (the server's token: $LONGLLAMA_TOKEN, --token-file or its server record,
auth.py); checked before the session exists (tcp.py). stdio needs none.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override
from lsprotocol import types
from pygls.protocol import default_converter

ASK = "longllama/ask"
STATUS = "longllama/status"
COMMAND_ASK = "longllama.ask"
COMMAND_REINDEX = "longllama.reindex"

# Error codes (JSON-RPC reserves -32099..-32000 for implementation-defined server errors).
UNAUTHORIZED = -32001  # TCP: initialize without the right token (the connection is then closed)
MODEL_UNAVAILABLE = -32003  # the model failed to load; message says why


@attrs.define
class AskParams:
    question: str = attrs.field()
    """The question, in natural language."""
    text_document: types.TextDocumentIdentifier | None = attrs.field(default=None)
    """The document the question is about: its live text joins the memory; optional."""
    max_tokens: int | None = attrs.field(default=None)
    """Most tokens in the answer (default: the `ask.maxTokens` setting)."""


@attrs.define
class SourceInfo:
    """A chunk the model attended to while writing an answer or completion."""

    path: str = attrs.field()
    """Path relative to its workspace folder (or the document's path for the open buffer)."""
    start_line: int = attrs.field()
    """First line, 1-based."""
    end_line: int = attrs.field()
    """Last line, 1-based, inclusive."""
    weight: float = attrs.field()
    """Share of all attention (summed over heads, memory layers and generated tokens) on this chunk."""
    symbol: str | None = attrs.field(default=None)
    """Enclosing definition (function, class, ...), when the chunker knew it."""
    uri: str | None = attrs.field(default=None)
    """file:// URI of the chunk's file, when known."""


@attrs.define
class AskResult:
    answer: str = attrs.field()
    """The answer text."""
    sources: list[SourceInfo] = attrs.field(factory=list)
    """Most-attended chunks, highest weight first."""
    stop_reason: str = attrs.field(default="")
    """"eos" (the model finished), "max_tokens", "repetition" (a loop, cut after its first copy)."""
    timings: dict[str, float] = attrs.field(factory=dict)
    """Milliseconds per stage: queue, memory, prefill, decode, total."""


@attrs.define
class StatusParams:
    """No fields; `params` may be omitted."""


@attrs.define
class StatusResult:
    version: str = attrs.field()
    """Server version."""
    model: str = attrs.field()
    """Model path or name."""
    engine: str = attrs.field()
    """"loading", "ready" or "error"."""
    device: str | None = attrs.field(default=None)
    """Device the model runs on (cpu, cuda:0, ...)."""
    dtype: str | None = attrs.field(default=None)
    """Compute dtype."""
    window: int | None = attrs.field(default=None)
    """Model window (max_position_embeddings)."""
    context_tokens: int | None = attrs.field(default=None)
    """Local-context tokens before the cursor used by completions."""
    indexing: str = attrs.field(default="off")
    """"off", "waiting" (for the model), "indexing", "watching", "idle" or "error"."""
    roots: list[str] = attrs.field(factory=list)
    """Indexed workspace folders."""
    files: int = attrs.field(default=0)
    """Indexed files, all roots."""
    chunks: int = attrs.field(default=0)
    """Chunks resident in memory, all roots."""
    memory_tokens: int = attrs.field(default=0)
    """Repository tokens resident in memory, all roots."""
    documents: int = attrs.field(default=0)
    """Open documents."""
    pending: int = attrs.field(default=0)
    """Requests queued for the model."""
    running: int | None = attrs.field(default=None)
    """Id of the engine request being generated now, if any."""
    requests: dict[str, int] = attrs.field(factory=dict)
    """Engine requests so far: completed, cancelled, failed."""
    last_timings: dict[str, float] = attrs.field(factory=dict)
    """Milliseconds per stage of the last completion."""
    settings: dict[str, Any] = attrs.field(factory=dict)
    """Effective settings (camelCase, as in initializationOptions)."""
    details: list[dict[str, Any]] = attrs.field(factory=list)
    """Each indexer's own status() dict, per root."""
    error: str | None = attrs.field(default=None)
    """Why the model or the indexer is unavailable."""


@attrs.define
class ReindexResult:
    started: bool = attrs.field()
    """False when indexing is off or the model is not loaded."""
    roots: list[str] = attrs.field(factory=list)
    """Folders being re-indexed."""


# -- JSON-RPC envelopes, so pygls structures (and validates) our params like LSP ones ----------------
# No defaults on jsonrpc/method: lsprotocol's converter omits fields equal to their default, and a
# request without "method" on the wire reads as a response.

@attrs.define
class AskRequest:
    id: int | str = attrs.field()
    jsonrpc: str = attrs.field()
    method: Literal["longllama/ask"] = attrs.field()
    params: AskParams = attrs.field()


@attrs.define
class AskResponse:
    id: int | str | None = attrs.field()
    jsonrpc: str = attrs.field()
    result: AskResult | None = attrs.field(default=None)


@attrs.define
class StatusRequest:
    id: int | str = attrs.field()
    jsonrpc: str = attrs.field()
    method: Literal["longllama/status"] = attrs.field()
    params: StatusParams | None = attrs.field(default=None)


@attrs.define
class StatusResponse:
    id: int | str | None = attrs.field()
    jsonrpc: str = attrs.field()
    result: StatusResult | None = attrs.field(default=None)


# method -> (request message type, response message type), as lsprotocol's METHOD_TO_TYPES
METHOD_TO_TYPES: dict[str, tuple[type, type]] = {
    ASK: (AskRequest, AskResponse),
    STATUS: (StatusRequest, StatusResponse),
}

RESULTS = (AskParams, SourceInfo, AskResult, StatusResult, ReindexResult)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def converter() -> cattrs.Converter:
    """pygls' converter, but our params and results keep every field on the wire.

    lsprotocol's converter omits fields equal to their default (files=0, sources=[]), which would
    make the documented fields above come and go.
    """
    conv = default_converter()
    for cls in RESULTS:
        renames = {a.name: override(rename=_camel(a.name)) for a in attrs.fields(cls)}
        conv.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, conv, _cattrs_omit_if_default=False,
                                                                     **renames))
    return conv
