"""What goes into the model for a completion and what comes back out; pure functions on text and ids.

Layout of a completion prompt over one buffer (tokens of the text before the cursor, then after):

    |<-- before: blocks -> memory -->|<----- window: local context ----->|^|<-- after: blocks -> memory -->|
    0                          k (multiple of stride)                   cursor

The window holds the last `context_tokens` tokens before the cursor, but its start `k` moves in
steps of `stride` tokens, so while the user types it stays put and the previous request's local
cache is reused (the common prefix is everything but the last few tokens). The text before `k`
and the text after the cursor become memory, in blocks of `stride` tokens aligned at 0 and at the
cursor: typing at the cursor changes neither, so their encodings stay cached (keyed by token hash).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

_EOL = re.compile(r"\r\n|\r|\n")
_WORD_CHAR = re.compile(r"[A-Za-z0-9_]")


@dataclass(frozen=True)
class Block:
    """A stretch of the buffer that goes to memory; lines are 1-based and inclusive."""

    ids: tuple[int, ...]
    start_line: int
    end_line: int

    @property
    def key(self) -> str:
        return hashlib.blake2b(repr(self.ids).encode(), digest_size=16).hexdigest()


@dataclass
class Prompt:
    ids: list[int]  # the local window, ends at the cursor
    before: list[Block]  # text before the window (memory), oldest first
    after: list[Block]  # text after the cursor (memory)
    line_prefix: str  # the cursor's line up to the cursor
    suffix: str  # everything after the cursor (for overlap trimming)
    window_start: int  # k: token index of the window's start in the text before the cursor
    window_offset: int = 0  # the window's start as a code-point offset into the text
    suffix_ids: list[int] = field(default_factory=list)  # the first `suffix_tokens` ids of `suffix` (FIM)


def _line_of(starts: list[int], offset: int) -> int:
    return bisect.bisect_right(starts, offset)  # 1-based line of a code-point offset


def _blocks(ids: Sequence[int], spans: Sequence[tuple[int, int]], base: int, stride: int,
            starts: list[int]) -> list[Block]:
    """Cut ids into blocks of `stride` tokens; spans are the tokens' character offsets (+ base)."""
    out = []
    for b in range(0, len(ids), stride):
        e = min(b + stride, len(ids))
        first, last = base + spans[b][0], base + max(spans[e - 1][1] - 1, spans[e - 1][0])
        out.append(Block(tuple(ids[b:e]), _line_of(starts, first), _line_of(starts, last)))
    return out


def window_start(n: int, context_tokens: int, stride: int) -> int:
    """k: the smallest multiple of `stride` that leaves at most `context_tokens` tokens in the window."""
    return 0 if n <= context_tokens else math.ceil((n - context_tokens) / stride) * stride


def tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and their (start, end) character offsets, no special tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]


def build_prompt(tokenizer: Any, text: str, offset: int, context_tokens: int, stride: int | None = None,
                 memory_tokens: int = 16384, suffix_tokens: int = 0) -> Prompt:
    """Split `text` at the code-point `offset` into the local window and memory blocks.

    stride: window step and memory block size (default context_tokens // 4). memory_tokens caps the
    buffer's own memory on each side (the blocks nearest the cursor are kept); 0: no memory blocks
    (a repository's bank holds the buffer), and the text after the cursor is not tokenized but for
    `suffix_tokens` ids of it, for a FIM prompt's suffix.
    """
    if not 0 <= offset <= len(text):
        raise ValueError(f"offset {offset} outside the document (0..{len(text)})")
    stride = max(1, stride or context_tokens // 4)
    starts = [0] + [m.end() for m in _EOL.finditer(text)]
    head, tail = text[:offset], text[offset:]
    ids, spans = tokenize(tokenizer, head)
    k = window_start(len(ids), context_tokens, stride)
    before = _blocks(ids[:k], spans[:k], 0, stride, starts) if k and memory_tokens else []
    before = before[max(0, len(before) - memory_tokens // stride):]
    after: list[Block] = []
    t_ids: list[int] = []
    if memory_tokens and tail.strip():
        t_ids, t_spans = tokenize(tokenizer, tail)
        after = _blocks(t_ids[:memory_tokens], t_spans[:memory_tokens], offset, stride, starts)
    elif suffix_tokens:  # no blocks: only the start of the tail (a token is rarely longer than 16 characters)
        t_ids, _ = tokenize(tokenizer, tail[: suffix_tokens * 16])
    line_prefix = head[head.rfind("\n") + 1:] if "\n" in head else head
    return Prompt(ids[k:], before, after, line_prefix.lstrip("\r"), tail, k, spans[k][0] if k < len(ids) else offset,
                  suffix_ids=t_ids[:suffix_tokens])


def word_before(line_prefix: str) -> str:
    """The identifier characters right before the cursor (what textDocument/completion replaces)."""
    i = len(line_prefix)
    while i > 0 and _WORD_CHAR.match(line_prefix[i - 1]):
        i -= 1
    return line_prefix[i:]


# -- stops ----------------------------------------------------------------------------------------

def _indent(line: str) -> int:
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip(" "))


def rest_of_line(suffix: str) -> str:
    m = _EOL.search(suffix)
    return suffix[: m.start()] if m else suffix


def _opens_a_bracket(line: str) -> bool:
    """Whether a completion's line ends by opening a bracket it leaves open: `foo(`, `x = [`, `d = {`. A
    brace only after `=`, `:`, `(`, `[`, `,` or `return` (a literal); `if (a) {` opens a block, which is block
    mode's."""
    code = line.rstrip()
    if not code.endswith(("(", "[", "{")):
        return False
    return code[-1] != "{" or re.search(r"(?:[=:(\[,]|\breturn)$", code[:-1].rstrip()) is not None


def _code(text: str) -> Iterator[tuple[int, str]]:
    """(index, character) of `text` outside strings ('', "", triple quotes) and `# ` comments; line breaks
    always. An unclosed one-line string ends with its line."""
    i, n, quote = 0, len(text), ""
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if text.startswith(quote, i):
                i, quote = i + len(quote), ""
                continue
            if ch != "\n" or len(quote) == 3:
                i += 1
                continue
            quote = ""
        if ch in "\"'":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            i += len(quote)
            continue
        if ch == "#" and text[i + 1:i + 2] in ("", " ", "\t", "\n"):
            eol = text.find("\n", i)
            i = n if eol < 0 else eol
            continue
        yield i, ch
        i += 1


def bracket_close(text: str) -> int | None:
    """Where a completion that leaves brackets open on its first line closes them: the index of the line
    break that ends the line where none is open any more; -1 when a blank line comes first (the model left
    the call unfinished); None while they are still open. A closer of a bracket opened before the completion
    (`b), foo(` after `bar(a, `) counts for nothing."""
    depth, line_start = 0, -1  # -1: still on the first line
    for i, ch in _code(text):
        if ch == "\n":
            if line_start >= 0 and depth <= 0:
                return i
            if line_start >= 0 and not text[line_start:i].strip():
                return -1
            line_start = i + 1
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return None


MAX_SYNTAX_BYTES = 1 << 20  # larger buffers skip the tree-sitter stop (a parse per check would cost too much)


class SyntaxBlock:
    """The block around the cursor per tree-sitter, for block mode's stop (issue 4).

    Brace languages: the innermost node holding the cursor that opens with `{`; the completion ends
    right after the generated text closes it (strings and comments do not count, unlike a brace
    count). Python: the innermost `block` holding the cursor line; a generated line ends the
    completion when it is indented below that block's statements, unless it starts inside a
    string (a docstring's lines are not a dedent). Each check re-parses the top-level definition
    around the cursor plus the generated text (a few KB: well under a millisecond per token).
    """

    def __init__(self, parser: Any, head: bytes, open_at: int | None, indent: int | None, python: bool):
        self.parser, self.head, self.open_at, self.indent, self.python = parser, head, open_at, indent, python

    @classmethod
    def at(cls, path: str | None, text: str, offset: int) -> SyntaxBlock | None:
        """The block at code-point `offset` of `text` (path picks the grammar); None without one."""
        if not path:
            return None
        try:
            import tree_sitter as ts

            from indexer.languages import language_for, ts_language
        except ImportError:
            return None
        name = language_for(path)
        lang = ts_language(name)
        if lang is None:
            return None
        head = text[:offset].encode("utf-8")
        data = head + text[offset:].encode("utf-8")
        if len(data) > MAX_SYNTAX_BYTES:
            return None
        parser = ts.Parser(lang)
        cur = len(head)
        chain = _chain(parser.parse(data).root_node, cur)
        if not chain:
            return None
        top = chain[0].start_byte
        python = name == "python"
        open_at = indent = None
        if python:
            line_start = head.rfind(b"\n") + 1
            cursor_indent = _indent(head[line_start:].decode("utf-8", "replace"))
            blocks = [n for n in chain if n.type == "block" and n.start_point[1] <= cursor_indent]
            # a parse error around the cursor (an unclosed bracket) can hide the inner blocks
            broken = chain[0].has_error
            indent = blocks[-1].start_point[1] if blocks and not broken else None
        else:
            braces = [n for n in chain if _opens_brace(n) and _close_after(n, cur)]
            open_at = braces[-1].start_byte - top if braces else None
        if open_at is None and indent is None and not python:
            return None
        return cls(parser, head[top:], open_at, indent, python)

    def _tree(self, generated: str) -> tuple[Any, bytes]:
        gen = generated.encode("utf-8")
        return self.parser.parse(self.head + gen).root_node, gen

    def closed(self, generated: str) -> str | None:
        """Brace languages: `generated` up to the brace that closes the cursor's block, if it does."""
        if self.open_at is None or "}" not in generated:
            return None
        root, gen = self._tree(generated)
        cur = len(self.head)
        for node in _chain(root, cur):
            if node.start_byte == self.open_at and _opens_brace(node):
                last = node.children[-1]
                if last.type == "}" and not last.is_missing and last.start_byte >= cur:
                    return gen[: last.end_byte - cur].decode("utf-8", "replace")
                return None
        return None

    def in_string(self, generated: str, line_starts: Sequence[int]) -> list[bool]:
        """Python: for each code-point offset into `generated`, whether it lies inside a string."""
        root, gen = self._tree(generated)
        data = self.head + gen
        cur = len(self.head)
        out = []
        for start in line_starts:
            at = cur + len(generated[:start].encode("utf-8"))
            node = root.descendant_for_byte_range(at, at + 1)
            inside = False
            while node is not None:
                if node.type in ("string", "concatenated_string") and node.start_byte < at:
                    inside = True
                    break
                node = node.parent
            # a string still open at the end of the generated text is an ERROR to tree-sitter
            out.append(inside or (root.has_error and _open_triple_quote(data[:at])))
        return out


def _open_triple_quote(code: bytes) -> bool:
    """Whether Python `code` ends inside a triple-quoted string (quotes scanned in order)."""
    opened: bytes | None = None
    i = 0
    while True:
        hits = [(code.find(q, i), q) for q in ((opened,) if opened else (b'"""', b"'''"))]
        hits = [(k, q) for k, q in hits if k >= 0]
        if not hits:
            return opened is not None
        k, q = min(hits)
        opened = None if opened else q
        i = k + 3


def _chain(root: Any, cur: int) -> list[Any]:
    """Nodes from the top-level one down: each the last child that starts before byte `cur`."""
    out, node = [], root
    while True:
        kids = [c for c in node.children if c.start_byte < cur]
        if not kids:
            return out
        node = kids[-1]
        out.append(node)


def _opens_brace(node: Any) -> bool:
    return node.child_count >= 2 and node.children[0].type == "{"


def _close_after(node: Any, cur: int) -> bool:
    """The node's closing brace is missing or at/after the cursor (the cursor is inside the braces)."""
    last = node.children[-1]
    return last.type != "}" or last.is_missing or last.start_byte >= cur


class StopRule:
    """Decides, on the text generated so far, where a completion ends.

    line: at the first newline after some text; when the cursor ends a non-empty line, the
    completion may instead be the whole next line ("\\n    return x"). block: at the first line
    whose indentation drops out of the cursor's block (below the cursor line, or to it when the
    cursor line opens a block with ':' or a bracket), a closing bracket at the block's level
    included; or at two blank lines. Block mode acts as line mode when text follows the cursor on
    its line, unless the prompt is fill-in-the-middle (`fim`): then the model reads that text and
    ends the middle itself (its end token), so a mid-line completion may span lines. With a
    `SyntaxBlock` (tree-sitter), block mode also ends right after a brace that closes the cursor's
    block, measures Python dedents against the enclosing block's indentation, and ignores
    "dedented" lines inside strings.
    """

    OPENERS = (":", "{", "(", "[", "=>")

    def __init__(self, mode: str, line_prefix: str, suffix: str, syntax: SyntaxBlock | None = None,
                 fim: bool = False):
        if mode not in ("line", "block"):
            raise ValueError(f"mode must be 'line' or 'block', got {mode!r}")
        after_cursor = rest_of_line(suffix)
        self.mode = "line" if after_cursor.strip() and not fim else mode
        self.next_line_ok = bool(line_prefix.strip()) and not after_cursor.strip()
        self.line_prefix = line_prefix
        # With text after the cursor (`)` the editor closed) the line stays one line: its end is there.
        self.spans_lines = self.mode == "line" and not after_cursor.strip()
        # Line mode on a blank line ends at the first line break, so a completion must put text on the line, at
        # the cursor's indentation (Decoder's `text_first`): the model's blank line first left the line empty,
        # and its extra spaces indented it past where the editor put the cursor.
        self.text_first = self.mode == "line" and not line_prefix.strip() and not after_cursor.strip()
        self.base = _indent(line_prefix)
        self.opens = line_prefix.rstrip().endswith(self.OPENERS)
        self.syntax = syntax if self.mode == "block" else None
        if self.syntax is not None and self.syntax.python and not self.opens and self.syntax.indent is not None:
            self.base = min(self.base, self.syntax.indent)  # the enclosing block's statements

    def __call__(self, text: str) -> tuple[str, bool]:
        """(the part of `text` to keep, whether the completion is finished)."""
        return self._line(text) if self.mode == "line" else self._block(text)

    def ended(self, text: str, out_of_tokens: bool) -> str:
        """What to keep of `text` when generation ended before the rule did (the model's end token, a loop,
        the token budget). Line mode keeps its first line: a call the model broke over lines and did not
        close stays `foo(`, as before line mode could span lines. Block mode, cut by the budget, drops the
        line the budget cut (`foo(a, ` or half a comment: accepted, it leaves code that does not parse)
        when lines the model finished come before it; a lone line stays, as in line mode: it is the start
        of what was asked for."""
        if self.mode == "line":
            return self._first_line(text, self._line_start(text))[0]
        kept, _ = self(text)
        if not out_of_tokens:
            return kept
        head, newline, _cut = kept.rpartition("\n")
        return head.rstrip() if newline and head.strip() else kept

    @staticmethod
    def _first_line(text: str, start: int) -> tuple[str, bool]:
        """(`text` up to the first line break at or after `start`, whether there is one)."""
        nl = text.find("\n", start)
        return (text, False) if nl < 0 else (text[:nl].rstrip("\r"), True)

    def _line_start(self, text: str) -> int:
        m = re.match(r"[ \t]*\r?\n", text) if self.next_line_ok else None
        return m.end() if m else 0

    def _line(self, text: str) -> tuple[str, bool]:
        """The first line; when it ends opening a bracket (`foo(`) and the model breaks the line there, the
        lines up to the one that closes it: `foo(` alone was all a user got of a call written black's way."""
        start = self._line_start(text)
        first, done = self._first_line(text, start)
        line = (self.line_prefix if start == 0 else "") + first[start:]
        if not done or not self.spans_lines or not first[start:].strip() or not _opens_a_bracket(line):
            return first, done
        end = bracket_close(text[start:])
        if end is None:
            return text, False
        return (first, True) if end < 0 else (text[:start + end].rstrip("\r"), True)

    def _block(self, text: str) -> tuple[str, bool]:
        kept, done = self._indented_block(text)
        syntax = self.syntax
        if syntax is not None and syntax.open_at is not None:
            closed = syntax.closed(text)
            # the brace that closes the block wins over the indentation stop just before its line
            if closed is not None and (not done or len(closed) <= len(kept)
                                       or text[len(kept):len(closed)].strip() == "}"):
                return closed, True
        return kept, done

    def _indented_block(self, text: str) -> tuple[str, bool]:
        lines = text.split("\n")
        blank_run = 0
        strings: list[bool] | None = None
        for i in range(1, len(lines)):
            line, complete = lines[i], i < len(lines) - 1
            if not line.strip():
                blank_run += complete
                if blank_run >= 2:
                    return "\n".join(lines[: i - 1]), True
                continue
            blank_run = 0
            ind = _indent(line)
            if (ind <= self.base) if self.opens else (ind < self.base):
                if self.syntax is not None and self.syntax.python:
                    if strings is None:  # one parse per check, only when a line dedents
                        starts = list(itertools.accumulate([0] + [len(x) + 1 for x in lines[:-1]]))
                        strings = self.syntax.in_string(text, starts)
                    if strings[i]:
                        continue
                if self.opens and ind == self.base and line.lstrip()[0] in ")]}":
                    if complete:
                        return "\n".join(lines[: i + 1]), True
                    continue
                return "\n".join(lines[:i]), True
        return text, False


def trim_overlap(text: str, suffix: str) -> str:
    """Drop the end of `text` that repeats the start of `suffix` (so accepting never duplicates).

    An overlap made only of identifier characters must be 4+ characters long: completing `fo` to
    `foo` before a suffix `o()` is not a duplicate.
    """
    for k in range(min(len(text), len(suffix)), 0, -1):
        head = suffix[:k]
        if text.endswith(head) and (k >= 4 or not any(c.isalnum() or c == "_" for c in head)):
            return text[:-k]
    return text


def finish(text: str, suffix: str) -> str:
    """Final clean-up of a completion: no trailing whitespace, no overlap with what follows."""
    text = text.rstrip()
    if not text.strip():
        return ""
    return trim_overlap(text, suffix).rstrip()


def streamable_text(tokenizer: Any, ids: Sequence[int]) -> str | None:
    """The text of ids decoded so far, or None while it ends in a partial UTF-8 character."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return None if text.endswith("\ufffd") else text
