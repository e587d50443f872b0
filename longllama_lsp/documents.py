"""Open documents and LSP positions, done by the spec.

pygls' workspace splits lines with `str.splitlines`, which also breaks at \\x0b, \\x0c, \\x1c-\\x1e,
\\x85, \\u2028 and \\u2029; LSP breaks lines only at \\n, \\r\\n and \\r
(https://microsoft.github.io/language-server-protocol/specifications/lsp/3.17/specification/#textDocuments),
so a form feed in a Python file shifts every later edit. This store keeps the text and converts
positions in the negotiated encoding (utf-16 by default, utf-8, utf-32) itself.

A position on a line past the last one is an error (`PositionError`); a character past the end of
its line means the end of the line, as the spec says.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from lsprotocol import types

_EOL = re.compile(r"\r\n|\r|\n")


class PositionError(ValueError):
    """A position that is not in the document."""


class UnknownDocument(KeyError):
    """A request names a document that was never opened (or was closed)."""

    def __str__(self) -> str:
        return f"unknown document {self.args[0]}: send textDocument/didOpen first"


def _units(ch: str, encoding: str) -> int:
    if encoding == types.PositionEncodingKind.Utf16:
        return 2 if ord(ch) > 0xFFFF else 1
    if encoding == types.PositionEncodingKind.Utf8:
        return len(ch.encode("utf-8", "surrogatepass"))
    return 1


@dataclass
class Document:
    uri: str
    text: str
    version: int | None = None
    language_id: str | None = None
    _starts: list[int] | None = field(default=None, repr=False)

    @property
    def line_starts(self) -> list[int]:
        """Offset (code points) where each line starts; a final EOL opens an empty last line."""
        if self._starts is None:
            self._starts = [0] + [m.end() for m in _EOL.finditer(self.text)]
        return self._starts

    def line_text(self, line: int) -> str:
        """Line `line` without its end-of-line characters."""
        starts = self.line_starts
        end = starts[line + 1] if line + 1 < len(starts) else len(self.text)
        return self.text[starts[line]:end].rstrip("\r\n")

    def offset_at(self, position: types.Position, encoding: str = types.PositionEncodingKind.Utf16,
                  clamp_line: bool = False) -> int:
        """Code-point offset of `position`; raises PositionError for a line past the end."""
        starts = self.line_starts
        line = position.line
        if line < 0 or position.character < 0:
            raise PositionError(f"negative position {position.line}:{position.character}")
        if line >= len(starts):
            if not clamp_line:
                raise PositionError(f"position {position.line}:{position.character} is past the end of "
                                    f"{self.uri} ({len(starts)} lines)")
            return len(self.text)
        units, col = 0, 0
        for ch in self.line_text(line):
            if units >= position.character:
                break
            units += _units(ch, encoding)
            col += 1
        return starts[line] + col

    def position_at(self, offset: int, encoding: str = types.PositionEncodingKind.Utf16) -> types.Position:
        starts = self.line_starts
        line = bisect.bisect_right(starts, offset) - 1
        prefix = self.text[starts[line]:offset]
        return types.Position(line=line, character=sum(_units(c, encoding) for c in prefix))

    def apply(self, change: types.TextDocumentContentChangeEvent, encoding: str) -> None:
        """Apply one didChange content change (ranged or full)."""
        if isinstance(change, types.TextDocumentContentChangePartial):
            # Clamped: a notification cannot be answered with an error; log-worthy but recoverable.
            start = self.offset_at(change.range.start, encoding, clamp_line=True)
            end = self.offset_at(change.range.end, encoding, clamp_line=True)
            start, end = min(start, end), max(start, end)
            self.text = self.text[:start] + change.text + self.text[end:]
        else:
            self.text = change.text
        self._starts = None


class DocumentLimit(ValueError):
    """An open or edit that would pass a session's limits (one document's size, their count, their sum)."""


MAX_DOCUMENT_CHARS = 4_000_000  # ~100k lines; larger buffers are refused, not tokenized per keystroke
MAX_DOCUMENTS = 1000  # open documents per session
MAX_SESSION_CHARS = 32_000_000  # all open documents of a session together (~32 MB of text)


class Documents:
    """uri -> Document for every open document. Only the server's event loop writes to it.

    Limits are checked when text arrives (didOpen, didChange), not when a request reads it: a
    refused open stores nothing; an edit past a limit drops that document (its text is no longer
    known), and requests for it answer 'unknown document'."""

    def __init__(self, max_documents: int = MAX_DOCUMENTS, max_chars: int = MAX_SESSION_CHARS,
                 max_document_chars: int = MAX_DOCUMENT_CHARS) -> None:
        self._docs: dict[str, Document] = {}
        self.max_documents, self.max_chars, self.max_document_chars = max_documents, max_chars, max_document_chars
        self.chars = 0  # sum of the open documents' lengths

    def open(self, item: types.TextDocumentItem) -> Document:
        old = self._docs.get(item.uri)
        others = self.chars - (len(old.text) if old else 0)
        if old is None and len(self._docs) >= self.max_documents:
            raise DocumentLimit(f"{len(self._docs)} documents are open (limit {self.max_documents}): "
                                f"{item.uri} not opened")
        self._check(item.uri, len(item.text), others)
        doc = Document(item.uri, item.text, item.version, item.language_id)
        self._docs[item.uri], self.chars = doc, others + len(item.text)
        return doc

    def change(self, params: types.DidChangeTextDocumentParams, encoding: str) -> Document:
        doc = self.get(params.text_document.uri)
        before = len(doc.text)
        try:
            for change in params.content_changes:
                doc.apply(change, encoding)
                self._check(doc.uri, len(doc.text), self.chars - before)
        except DocumentLimit:
            self.chars -= before
            del self._docs[doc.uri]
            raise
        self.chars += len(doc.text) - before
        doc.version = params.text_document.version
        return doc

    def _check(self, uri: str, length: int, others: int) -> None:
        if length > self.max_document_chars:
            raise DocumentLimit(f"{uri} has {length} characters (limit {self.max_document_chars}): not kept")
        if others + length > self.max_chars:
            raise DocumentLimit(f"open documents would hold {others + length} characters (limit "
                                f"{self.max_chars} per session): {uri} not kept")

    def close(self, uri: str) -> None:
        doc = self._docs.pop(uri, None)
        if doc is not None:
            self.chars -= len(doc.text)

    def get(self, uri: str) -> Document:
        try:
            return self._docs[uri]
        except KeyError:
            raise UnknownDocument(uri) from None

    def __contains__(self, uri: str) -> bool:
        return uri in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def uris(self) -> list[str]:
        return list(self._docs)
