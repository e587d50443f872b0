"""Answers that stop: spot a generation caught in a loop, and say where to cut it.

A small model decoding greedily can fall into a cycle: one sentence, or one line of code, again and
again until the token limit (issue 19: `longllama ask` repeated one sentence for 300 tokens). Two
pure checks, meant to run after every generated token:

    guard = RepetitionGuard()
    for token in decode():
        ids.append(token)
        keep = guard.check(ids)          # None, or how many ids to keep
        if keep is not None:
            ids = ids[:keep]; break

- `loop_in_tail(ids)`: the last tokens are one block (a period of 1..max_period tokens) repeated
  at least `min_repeats` times, over at least `min_span` tokens. Cut after the first copy.
- `repeating_tail(ids)`: how many trailing tokens repeat earlier ones; a stream holds them back, so a
  loop's second copy is never shown before `loop_in_tail` cuts it (`longllama ask` streamed the loop).
- `repeated_line_end(text)`: the same non-trivial line `min_repeats` times in a row (blank lines
  between them ignored; for answers, also long lines that differ only in their numbers). Cut after
  the first copy. Short lines (`}`, `return`, `pass`) never count,
  and neither do repeats that are not consecutive: code repeats lines legitimately.

Thresholds are about loops, not style: data tables such as `0, 0, 0, ...` are periodic too, so the
span must be long (48 tokens by default) before a token loop counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


def loop_in_tail(ids: Sequence[int], *, min_repeats: int = 3, max_period: int = 64,
                 min_span: int = 48) -> int | None:
    """How many of `ids` to keep when their tail is a loop (the first copy stays), else None.

    For each period p, `run` counts the trailing positions i with ids[i] == ids[i - p]; the tail
    then holds run + p tokens of period p, i.e. (run + p) / p copies of one block.
    """
    n = len(ids)
    best: int | None = None
    for p in range(1, min(max_period, n // min_repeats) + 1):
        run = _tail_run(ids, p)
        span = run + p
        if span >= min_span and span >= min_repeats * p:
            keep = n - run  # everything before the loop, plus its first copy
            best = keep if best is None else min(best, keep)
    return best


def repeating_tail(ids: Sequence[int], *, max_period: int = 64) -> int:
    """How many of the last `ids` repeat the ids some period p <= max_period before them (the longest
    such run over p; 0 when none). A stream that shows only ids[:len(ids) - repeating_tail(ids)] never
    shows a loop's second copy: loop_in_tail keeps at most that many ids (its keep is n - run for one p).
    """
    return max((_tail_run(ids, p) for p in range(1, min(max_period, len(ids) - 1) + 1)), default=0)


def _tail_run(ids: Sequence[int], p: int) -> int:
    """How many trailing ids equal the id p positions before them."""
    n, run = len(ids), 0
    while run < n - p and ids[n - 1 - run] == ids[n - 1 - run - p]:
        run += 1
    return run


_NUMBER = re.compile(r"\d+")


def _line_key(line: str, numbers: bool) -> str:
    """What two lines are compared by: their text without surrounding whitespace, numbers as 0 with `numbers`."""
    key = line.strip()
    return _NUMBER.sub("0", key) if numbers else key


def repeated_line_end(text: str, *, min_repeats: int = 3, min_chars: int = 12, numbers: bool = False
                      ) -> int | None:
    """Offset in `text` just after the first of `min_repeats` identical consecutive lines, else None.

    Only complete lines count (a line still being generated may yet differ). Lines are compared
    without surrounding whitespace; blank lines between the copies are ignored. With `numbers`, lines
    that differ only in their numbers count as copies ("4. **X**: ...", "5. **X**: ...": a numbered
    list caught in a loop).
    """
    previous, count, first_end, offset = None, 0, 0, 0
    lines = text.split("\n")[:-1]  # the last piece has no newline yet: not complete
    for line in lines:
        end = offset + len(line) + 1
        key = _line_key(line, numbers)
        offset = end
        if not key:
            continue
        if key == previous:
            count += 1
            if count >= min_repeats and len(key) >= min_chars:
                return first_end
        else:
            previous, count, first_end = key, 1, end
    return None


def copied_lines_start(text: str, *, min_chars: int = 12, numbered_chars: int | None = None) -> int:
    """Where the trailing run of lines that copy the line before them starts in `text` (len(text) when
    none): a stream holds them back, so a line loop's copies are not shown before `repeated_line_end`
    cuts it. A line copies its predecessor (the previous non-blank line, of at least min_chars) when
    equal to it, or with `numbered_chars`, equal but for numbers and that long; the last line, still
    being generated, when it begins the same way."""
    pieces, offset = [], 0
    for line in text.split("\n"):
        if line.strip():
            pieces.append((offset, line.strip()))
        offset += len(line) + 1
    complete = text.endswith("\n")
    start = len(text)
    for i in range(len(pieces) - 1, 0, -1):
        (begin, line), (_, before) = pieces[i], pieces[i - 1]
        last = i == len(pieces) - 1 and not complete
        if not (_copies(line, before, last, min_chars, False)
                or (numbered_chars is not None and _copies(line, before, last, numbered_chars, True))):
            break
        start = begin
    return start


def _copies(line: str, before: str, partial: bool, min_chars: int, numbers: bool) -> bool:
    if len(before) < min_chars:
        return False
    line, before = _line_key(line, numbers), _line_key(before, numbers)
    return before.startswith(line) if partial else line == before


@dataclass
class RepetitionGuard:
    """Both checks with one set of thresholds; `check` is cheap enough to call per token."""

    min_repeats: int = 3
    max_period: int = 64  # tokens: a sentence or a line of code
    min_span: int = 48  # tokens a loop must cover before it counts
    min_line_chars: int = 12
    # A loop whose lines differ only in their numbers (a numbered list repeating one item) ends after
    # this many copies of a line of at least numbered_line_chars characters (None: off). Answers only:
    # code repeats such lines legitimately (`x[0] = a`, `x[1] = a`), and long ones rarely.
    numbered_repeats: int | None = None
    numbered_line_chars: int = 40

    def check(self, ids: Sequence[int]) -> int | None:
        """How many ids to keep when their tail is a loop, else None."""
        return loop_in_tail(ids, min_repeats=self.min_repeats, max_period=self.max_period,
                            min_span=self.min_span)

    def held(self, ids: Sequence[int]) -> int:
        """How many trailing ids a stream should hold back: they may be a loop's second copy. Ordinary
        text holds a token or two (a token that also stood p tokens back) and shows it a step later."""
        return repeating_tail(ids, max_period=self.max_period)

    def held_text(self, text: str) -> int:
        """How many trailing characters of a streamed answer to hold back: lines that copy the line
        before them (`copied_lines_start`), shown once the copying stops, never when it is a loop."""
        return len(text) - copied_lines_start(text, min_chars=self.min_line_chars,
                                              numbered_chars=self.numbered_line_chars
                                              if self.numbered_repeats is not None else None)

    def cut_text(self, text: str) -> str | None:
        """`text` cut after the first copy of a repeated line, or None when it has none."""
        ends = [repeated_line_end(text, min_repeats=self.min_repeats, min_chars=self.min_line_chars)]
        if self.numbered_repeats is not None:
            ends.append(repeated_line_end(text, min_repeats=self.numbered_repeats,
                                          min_chars=self.numbered_line_chars, numbers=True))
        found = [e for e in ends if e is not None]
        return text[:min(found)] if found else None
