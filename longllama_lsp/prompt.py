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
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
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
                 memory_tokens: int = 16384) -> Prompt:
    """Split `text` at the code-point `offset` into the local window and memory blocks.

    stride: window step and memory block size (default context_tokens // 4). memory_tokens caps the
    buffer's own memory on each side (the blocks nearest the cursor are kept).
    """
    if not 0 <= offset <= len(text):
        raise ValueError(f"offset {offset} outside the document (0..{len(text)})")
    stride = max(1, stride or context_tokens // 4)
    starts = [0] + [m.end() for m in _EOL.finditer(text)]
    head, tail = text[:offset], text[offset:]
    ids, spans = tokenize(tokenizer, head)
    k = window_start(len(ids), context_tokens, stride)
    before = _blocks(ids[:k], spans[:k], 0, stride, starts) if k else []
    before = before[max(0, len(before) - memory_tokens // stride):]
    after: list[Block] = []
    if tail.strip():
        t_ids, t_spans = tokenize(tokenizer, tail)
        after = _blocks(t_ids[:memory_tokens], t_spans[:memory_tokens], offset, stride, starts)
    line_prefix = head[head.rfind("\n") + 1:] if "\n" in head else head
    return Prompt(ids[k:], before, after, line_prefix.lstrip("\r"), tail, k)


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


class StopRule:
    """Decides, on the text generated so far, where a completion ends.

    line: at the first newline after some text; when the cursor ends a non-empty line, the
    completion may instead be the whole next line ("\\n    return x"). block: at the first line
    whose indentation drops out of the cursor's block (below the cursor line, or to it when the
    cursor line opens a block with ':' or a bracket), a closing bracket at the block's level
    included; or at two blank lines. Block mode acts as line mode when text follows the cursor on
    its line.
    """

    OPENERS = (":", "{", "(", "[", "=>")

    def __init__(self, mode: str, line_prefix: str, suffix: str):
        if mode not in ("line", "block"):
            raise ValueError(f"mode must be 'line' or 'block', got {mode!r}")
        after_cursor = rest_of_line(suffix)
        self.mode = "line" if after_cursor.strip() else mode
        self.next_line_ok = bool(line_prefix.strip()) and not after_cursor.strip()
        self.base = _indent(line_prefix)
        self.opens = line_prefix.rstrip().endswith(self.OPENERS)

    def __call__(self, text: str) -> tuple[str, bool]:
        """(the part of `text` to keep, whether the completion is finished)."""
        return self._line(text) if self.mode == "line" else self._block(text)

    def _line(self, text: str) -> tuple[str, bool]:
        start = 0
        if self.next_line_ok:
            m = re.match(r"[ \t]*\r?\n", text)
            start = m.end() if m else 0
        nl = text.find("\n", start)
        return (text, False) if nl < 0 else (text[:nl].rstrip("\r"), True)

    def _block(self, text: str) -> tuple[str, bool]:
        lines = text.split("\n")
        blank_run = 0
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


def incremental_text(tokenizer: Any, ids: Sequence[int], shown: int) -> tuple[str, int]:
    """(new text to stream, new shown length) for ids decoded so far, holding back a partial UTF-8 char."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    if text.endswith("\ufffd"):
        return "", shown
    return text[shown:], len(text)
