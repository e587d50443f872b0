"""bytes -> Chunks: syntax-aware pieces of a file, each within a token budget.

Invariants (tested in tests/test_chunker.py):
- the chunks of a file cover its bytes in order, without gaps or overlap (a UTF-8 BOM, recorded in
  `decode_policy`, is the only thing left out), so `"".join(c.text for c in chunks) == decode(data).text`;
- `chunk.text == decode_bytes(data[chunk.start_byte:chunk.end_byte], policy)`, byte ranges are true to
  the original bytes (CRLF/mixed line endings are kept verbatim);
- lines are 1-based and inclusive (`start_line`..`end_line`), counted by b"\\n";
- `token_count <= budget` except when the budget is so small that one character exceeds it.

Splitting, top down: the children of a node become pieces (comments/decorators glued to the
definition after them; the text before the first child is a "header" piece). A definition that fits
the budget is one chunk; runs of other pieces are packed up to the budget. An oversized piece is split
into its own children (its body's, for classes and functions), so a large class becomes header +
methods. Depth is bounded, then lines, then characters take over.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import tree_sitter as ts

from indexer.languages import CLASS_LIKE, SPECS, LanguageSpec, definition_of, language_for, ts_language

logger = logging.getLogger(__name__)

MAX_DEPTH = 32  # nested oversized nodes before falling back to lines; far below Python's recursion limit
_SURROGATES = re.compile("[\udc80-\udcff]")
_HIGH_BYTES = re.compile(rb"[\x80-\xff]")


@dataclass(frozen=True)
class Chunk:
    path: str
    language: str
    start_byte: int
    end_byte: int  # exclusive
    start_line: int  # 1-based, inclusive
    end_line: int  # 1-based, inclusive
    symbol: str | None  # "Class.method" for a definition or a part of one; None for top-level statements
    kind: str  # function, method, class, interface, struct, enum, impl, trait, namespace, module, type, macro, statements, lines
    text: str
    token_count: int
    content_hash: str  # sha256 hex of text.encode("utf-8")
    memory_key: str | None = None  # set by the indexer (indexer.encoder.keyed); None: encoded alone


@dataclass
class ChunkedFile:
    path: str
    language: str
    chunks: list[Chunk]
    decode_policy: str  # utf-8 | utf-8-sig (BOM stripped) | latin-1 | utf-8+replace (bad bytes -> U+FFFD)
    parse_policy: str = "lines"  # syntax | syntax+errors (tree-sitter recovered) | lines
    skip_reason: str | None = None


@dataclass(frozen=True)
class Decoded:
    text: str
    policy: str
    bom: int  # bytes of BOM stripped from the front


def decode(data: bytes) -> Decoded:
    """Decode file bytes; the policy says how, so byte ranges can be re-decoded piecewise."""
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    body = data[bom:]
    try:
        return Decoded(body.decode("utf-8"), "utf-8-sig" if bom else "utf-8", bom)
    except UnicodeDecodeError:
        pass
    escaped = body.decode("utf-8", "surrogateescape")
    bad = len(_SURROGATES.findall(escaped))
    # No valid multi-byte sequence at all: a legacy 8-bit file (latin-1 maps every byte, exactly).
    if not bom and bad == len(_HIGH_BYTES.findall(body)):
        return Decoded(body.decode("latin-1"), "latin-1", 0)
    return Decoded(_SURROGATES.sub("\ufffd", escaped), "utf-8+replace", bom)


def decode_bytes(data: bytes, policy: str) -> str:
    """Decode a slice with a file's policy; each undecodable byte becomes one U+FFFD."""
    if policy == "latin-1":
        return data.decode("latin-1")
    if policy == "utf-8+replace":
        return _SURROGATES.sub("\ufffd", data.decode("utf-8", "surrogateescape"))
    return data.decode("utf-8")


@dataclass(frozen=True)
class _Piece:
    start: int
    end: int
    node: ts.Node | None
    kind: str
    symbol: str | None
    is_def: bool


class _Chunker:
    """State for chunking one file; offsets are into `body` (the file without its BOM)."""

    def __init__(self, body: bytes, policy: str, count_tokens: Callable[[str], int], budget: int):
        self.body, self.policy, self.budget = body, policy, max(1, budget)
        self._count = count_tokens
        self._cache: dict[tuple[int, int], int] = {}
        # Tokens per byte seen so far in this file; starts at ~3 bytes/token (code in a byte BPE).
        self._counted_tokens, self._counted_bytes = 1.0, 3.0
        self.line_starts = [0] + [m.end() for m in re.finditer(b"\n", body)]
        # UTF-8 bytes of text per byte of file: latin-1 high bytes become 2, U+FFFD is 3.
        self.expansion = {"latin-1": 2, "utf-8+replace": 3}.get(policy, 1)

    def text(self, start: int, end: int) -> str:
        return decode_bytes(self.body[start:end], self.policy)

    def tokens(self, start: int, end: int) -> int:
        n = self._cache.get((start, end))
        if n is None:
            n = self._cache[(start, end)] = self._count(self.text(start, end))
            self._counted_tokens += n
            self._counted_bytes += end - start
        return n

    def estimate(self, start: int, end: int) -> float:
        return (end - start) * self._counted_tokens / self._counted_bytes

    def fits(self, start: int, end: int) -> bool:
        """Whether [start, end) is within the budget, tokenizing only when the answer is unclear.

        Tokenizing is the cost that dominates chunking, so: a byte-level token covers >= 1 byte
        of UTF-8 text (short spans fit for sure; the slack covers a BOS or prefix-space token some tokenizers
        add), and spans estimated at 1.5x the budget are split unseen.
        """
        if (end - start) * self.expansion <= self.budget - 4:
            return True
        if self.estimate(start, end) > 1.5 * self.budget:
            return False
        return self.tokens(start, end) <= self.budget

    def line_start(self, offset: int) -> int:
        return self.line_starts[bisect.bisect_right(self.line_starts, offset) - 1]

    def safe_cut(self, offset: int, step: int = 1) -> int:
        """Move a cut out of a valid UTF-8 sequence (forward, or back with step=-1), so both
        sides decode as the whole does."""
        if self.policy == "latin-1":
            return offset
        for _ in range(3):
            if not 0 < offset < len(self.body) or not self._inside_sequence(offset):
                break
            offset += step
        return offset

    def _inside_sequence(self, i: int) -> bool:
        if not 0x80 <= self.body[i] < 0xC0:
            return False
        for j in range(i - 1, max(i - 4, -1), -1):
            lead = self.body[j]
            if 0x80 <= lead < 0xC0:
                continue
            length = (
                2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
            )
            if j + length <= i:
                return False  # a stray continuation byte: decoded (escaped) on its own
            try:
                self.body[j : j + length].decode("utf-8")
                return True
            except UnicodeDecodeError:
                return False
        return False

    def pack(self, run: list[_Piece]) -> list[_Piece]:
        """Merge consecutive pieces (each within budget) into as few chunks as the budget allows.

        Guess each chunk's extent from the running tokens-per-byte estimate, then count it once;
        on overshoot the estimate has been corrected by that count, so guess again (shorter).
        """
        out: list[_Piece] = []
        i = 0
        while i < len(run):
            target = 0.9 * self.budget
            j = i
            while j + 1 < len(run) and self.estimate(run[i].start, run[j + 1].end) <= target:
                j += 1
            while j > i and self.tokens(run[i].start, run[j].end) > self.budget:
                limit, j, target = j - 1, i, 0.85 * target
                while j < limit and self.estimate(run[i].start, run[j + 1].end) <= target:
                    j += 1
            out.append(_replace_end(run[i], run[j].end))
            i = j + 1
        return out

    # -- line and character fallback -------------------------------------------------------

    def by_lines(self, start: int, end: int, kind: str, symbol: str | None) -> list[_Piece]:
        """Pack whole lines up to the budget; a line that alone exceeds it is split by characters."""
        lines: list[_Piece] = []
        i = bisect.bisect_right(self.line_starts, start)
        cur = start
        while cur < end:
            line_end = min(end, self.line_starts[i]) if i < len(self.line_starts) else end
            i += 1
            if self.fits(cur, line_end):
                lines.append(_Piece(cur, line_end, None, kind, symbol, False))
            else:
                lines.extend(self.by_chars(cur, line_end, kind, symbol))
            cur = line_end
        return self.pack(lines)

    def by_chars(self, start: int, end: int, kind: str, symbol: str | None) -> list[_Piece]:
        """Split one giant line into near-equal byte spans, re-splitting any span still too big."""
        done: list[tuple[int, int]] = []
        todo = [(start, end)]
        while todo:
            s, e = todo.pop()
            if e - s <= 1 or self.fits(s, e):
                done.append((s, e))
                continue
            parts = max(2, int(self.estimate(s, e) / (0.8 * self.budget)) + 1)
            step = max(1, (e - s) // parts)
            cuts = [s]
            for k in range(1, parts):
                c = self.safe_cut(s + k * step)
                if not cuts[-1] < c < e:
                    c = self.safe_cut(s + k * step, -1)
                if cuts[-1] < c < e:
                    cuts.append(c)
            cuts.append(e)
            if len(cuts) == 2:  # could not cut (a run of continuation bytes): accept it
                done.append((s, e))
                continue
            todo.extend(reversed(list(zip(cuts, cuts[1:], strict=False))))
        done.sort()
        return [_Piece(s, e, None, kind, symbol, False) for s, e in done]

    # -- syntax-aware splitting ------------------------------------------------------------

    def split(
        self, node: ts.Node, lo: int, hi: int, spec: LanguageSpec, scope: _Piece | None, depth: int
    ) -> list[_Piece]:
        """Final pieces for bytes [lo, hi) of `node`: each fits the budget (or was split by lines)."""
        kind = scope.kind if scope else "statements"
        symbol = scope.symbol if scope else None
        target = _split_target(node, spec)
        kids = [c for c in target.named_children if c.end_byte > c.start_byte and lo <= c.start_byte < hi]
        if depth > MAX_DEPTH or not kids:
            return self.by_lines(lo, hi, kind, symbol)
        out: list[_Piece] = []
        run: list[_Piece] = []  # consecutive non-definition pieces of this scope, packed on flush

        def flush() -> None:
            out.extend(self.pack(run))
            run.clear()

        for piece in self.pieces(kids, lo, hi, spec, scope):
            fits = self.fits(piece.start, piece.end)
            if piece.is_def:  # a definition is its own chunk, or its own series of chunks
                flush()
                out.extend([piece] if fits else self.split_piece(piece, spec, depth))
                continue
            # A plain statement's parts belong to this scope: pack them with their neighbours.
            for sub in [piece] if fits else self.split_piece(piece, spec, depth):
                if sub.is_def:
                    flush()
                    out.append(sub)
                else:
                    run.append(sub)
        flush()
        return out

    def split_piece(self, piece: _Piece, spec: LanguageSpec, depth: int) -> list[_Piece]:
        if piece.node is None or piece.node.named_child_count == 0:
            return self.by_lines(piece.start, piece.end, piece.kind, piece.symbol)
        scope = piece if piece.is_def else None
        if scope is None and piece.kind != "statements":
            scope = _Piece(piece.start, piece.end, None, piece.kind, piece.symbol, False)
        return self.split(piece.node, piece.start, piece.end, spec, scope, depth + 1)

    def pieces(
        self, kids: list[ts.Node], lo: int, hi: int, spec: LanguageSpec, scope: _Piece | None
    ) -> list[_Piece]:
        """Cut [lo, hi) at line starts before each child, gluing comments to the next child."""
        groups = _glue_comments(kids, spec)
        out: list[_Piece] = []
        first = groups[0][0].start_byte
        head_end = self.line_start(first)
        head_end = self.safe_cut(head_end if head_end > lo else first)
        if head_end > lo and self.body[lo:head_end].strip():
            out.append(self.piece_for(None, lo, head_end, spec, scope))
        else:
            head_end = lo
        for i, group in enumerate(groups):
            start = head_end if i == 0 else self.cut_before(group[0], groups[i - 1][-1])
            if out and not out[-1].start < start < hi:
                continue  # cut could not advance (same-line children on a multibyte run): merge
            if out:
                out[-1] = _replace_end(out[-1], start)
            main = next((n for n in reversed(group) if n.type not in spec.attach_forward), group[-1])
            out.append(self.piece_for(main, start, hi, spec, scope))
        return out

    def cut_before(self, node: ts.Node, prev: ts.Node) -> int:
        start = self.line_start(node.start_byte)
        return self.safe_cut(start if start >= prev.end_byte else node.start_byte)

    def piece_for(
        self, node: ts.Node | None, start: int, end: int, spec: LanguageSpec, scope: _Piece | None
    ) -> _Piece:
        definition = definition_of(node, spec) if node is not None else None
        if definition is None:
            return _Piece(
                start,
                end,
                node,
                scope.kind if scope else "statements",
                scope.symbol if scope else None,
                False,
            )
        kind = definition.kind
        if kind == "function" and scope is not None and scope.kind in CLASS_LIKE:
            kind = "method"
        symbol = definition.name
        if scope is not None and scope.symbol and symbol:
            symbol = f"{scope.symbol}.{symbol}"
        return _Piece(start, end, node, kind, symbol or (scope.symbol if scope else None), True)


def _glue_comments(kids: list[ts.Node], spec: LanguageSpec) -> list[list[ts.Node]]:
    """Group comments (and decorators, attributes) with the node after them; a comment on the
    same line as the end of the previous node (`}  // namespace x`) stays with that node."""
    groups: list[list[ts.Node]] = []
    pending: list[ts.Node] = []
    for kid in kids:
        glued = kid.type in spec.attach_forward
        if glued and groups and not pending and kid.start_point.row == groups[-1][-1].end_point.row:
            groups[-1].append(kid)
            continue
        pending.append(kid)
        if not glued:
            groups.append(pending)
            pending = []
    if pending:
        groups.append(pending)
    return groups


def _replace_end(piece: _Piece, end: int) -> _Piece:
    return _Piece(piece.start, end, piece.node, piece.kind, piece.symbol, piece.is_def)


def _split_target(node: ts.Node, spec: LanguageSpec) -> ts.Node:
    """The node whose children are the parts of `node`: its body, looking through wrappers.

    `export class A {…}` -> class_body, `@dec def f(): …` -> block, `const f = () => {…}` ->
    statement_block. Without a body, descend into a child holding most of the bytes, but never from
    a plain statement (or the root) into a definition: that definition must stay one piece.
    """
    for _ in range(8):
        body = node.child_by_field_name("body")
        if body is not None and body.named_child_count > 0:
            return body
        size = node.end_byte - node.start_byte
        biggest = max(node.named_children, key=lambda c: c.end_byte - c.start_byte, default=None)
        if (
            biggest is None
            or biggest.named_child_count == 0
            or 2 * (biggest.end_byte - biggest.start_byte) < size
        ):
            return node
        if definition_of(node, spec) is None and definition_of(biggest, spec) is not None:
            return node
        node = biggest
    return node


def chunk_file(path: str, data: bytes, count_tokens: Callable[[str], int], budget: int = 256) -> ChunkedFile:
    """Chunk one file; never raises: a failure becomes `skip_reason` (or a fallback to lines)."""
    language = "text"
    try:
        language = language_for(path, data[:4096])
        decoded = decode(data)
        body = data[decoded.bom :]
        chunker = _Chunker(body, decoded.policy, count_tokens, budget)
        pieces, parse_policy = _syntax_pieces(chunker, language)
        chunks = [_to_chunk(chunker, p, path, language, decoded.bom) for p in pieces]
        return ChunkedFile(path, language, chunks, decoded.policy, parse_policy)
    except Exception as err:  # a per-file failure must not stop indexing of the rest of the repo
        logger.warning("chunking %s failed: %r", path, err)
        return ChunkedFile(
            path, language, [], "unknown", "lines", f"chunker failed: {type(err).__name__}: {err}"
        )


def _syntax_pieces(chunker: _Chunker, language: str) -> tuple[list[_Piece], str]:
    body = chunker.body
    if not body:
        return [], "lines"
    ts_lang = ts_language(language)
    if ts_lang is None:
        return chunker.by_lines(0, len(body), "lines", None), "lines"
    try:
        tree = ts.Parser(ts_lang).parse(body)
        pieces = chunker.split(tree.root_node, 0, len(body), SPECS[language], None, 0)
        return pieces, "syntax+errors" if tree.root_node.has_error else "syntax"
    except RecursionError:  # belt and braces: MAX_DEPTH should make this unreachable
        logger.warning("syntax chunking recursed too deep; falling back to lines")
        return chunker.by_lines(0, len(body), "lines", None), "lines"


def _to_chunk(chunker: _Chunker, piece: _Piece, path: str, language: str, bom: int) -> Chunk:
    text = chunker.text(piece.start, piece.end)
    start_line = bisect.bisect_right(chunker.line_starts, piece.start)
    end_line = bisect.bisect_right(chunker.line_starts, max(piece.start, piece.end - 1))
    return Chunk(
        path=path,
        language=language,
        start_byte=piece.start + bom,
        end_byte=piece.end + bom,
        start_line=start_line,
        end_line=end_line,
        symbol=piece.symbol,
        kind=piece.kind,
        text=text,
        token_count=chunker.tokens(piece.start, piece.end),
        content_hash=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )
