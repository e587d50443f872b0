"""Baseline (b): snippet retrieval as the peer assistants do it, pasted into the prompt as comments.

What this reproduces (see /work/shared/reference/assistants.md):
- Corpus: sliding windows of WINDOW lines (stride STRIDE) over the *other* files of the repository
  (RepoCoder / CrossCodeEval "sparse retrieval"; Cody uses 50-line windows, Tabby 500-char chunks).
- Query: the last WINDOW lines before the cursor (the hole line's prefix included).
- Scoring: Okapi BM25 over identifier tokens (Tabby's server-side code search is BM25 via tantivy,
  Continue's index is SQLite FTS5 BM25); `--scorer jaccard` gives Cody/Continue's Jaccard instead.
- Prompt: the top windows rendered as line comments headed by `# Path: <file>` (Tabby's
  `completion_prompt.rs` format), best snippet last (nearest the code, as RepoCoder orders them),
  at most 2 windows per file (Tabby), overlapping windows of one file skipped, filling a snippet
  budget of at most half the prompt (Refact's rag_ratio 0.5). The in-file prefix is cut (whole
  lines, oldest first) so that snippets + prefix fit the same token count system (a) gets.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from longllama_lsp.lexical import identifiers  # the product's retrieval tokenizes names the same way

WINDOW, STRIDE = 20, 10
MAX_PER_FILE = 2


@dataclass(frozen=True)
class Window:
    path: str
    start: int  # 0-based first line
    lines: tuple[str, ...]

    def raw(self, path: bool = True) -> str:
        """The window as code (for memory, where no prompt format applies), under a `# Path:` line."""
        return (f"# Path: {self.path}\n" if path else "") + "".join(ln.rstrip() + "\n" for ln in self.lines)

    def render(self) -> str:
        body = "".join(f"# {ln}".rstrip() + "\n" for ln in self.lines)
        return f"# Path: {self.path}\n{body}"


class SnippetIndex:
    """BM25 (or Jaccard) over WINDOW-line windows of every file of one repository."""

    def __init__(self, root: Path, files: list[str], k1: float = 1.5, b: float = 0.75):
        self.windows: list[Window] = []
        for rel in files:
            lines = (root / rel).read_text(encoding="utf-8").splitlines()
            for s in range(0, max(1, len(lines) - WINDOW + STRIDE), STRIDE):
                chunk = tuple(lines[s:s + WINDOW])
                if any(ln.strip() for ln in chunk):
                    self.windows.append(Window(rel, s, chunk))
        self.tf = [Counter(identifiers("\n".join(w.lines))) for w in self.windows]
        self.sets = [set(c) for c in self.tf]
        self.lengths = [sum(c.values()) for c in self.tf]
        self.avg = sum(self.lengths) / max(1, len(self.lengths))
        df: Counter = Counter()
        for c in self.tf:
            df.update(c.keys())
        n = len(self.windows)
        self.idf = {t: math.log((n - d + 0.5) / (d + 0.5) + 1.0) for t, d in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str, scorer: str = "bm25") -> list[float]:
        q = identifiers(query)
        if scorer == "jaccard":
            qs = set(q)
            return [len(qs & s) / len(qs | s) if qs or s else 0.0 for s in self.sets]
        qc = Counter(q)
        out = []
        for tf, length in zip(self.tf, self.lengths, strict=True):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg)
            out.append(sum(self.idf.get(t, 0.0) * tf[t] * (self.k1 + 1) / (tf[t] + norm) * qn
                           for t, qn in qc.items() if t in tf))
        return out

    def top(self, query: str, exclude_path: str, scorer: str = "bm25", limit: int = 20,
            per_file_limit: int = MAX_PER_FILE) -> list[tuple[float, Window]]:
        """Best windows from other files: at most `per_file_limit` per file, no overlap within a file."""
        ranked = sorted(((s, i) for i, s in enumerate(self.scores(query, scorer)) if s > 0),
                        key=lambda x: (-x[0], x[1]))
        out: list[tuple[float, Window]] = []
        per_file: Counter = Counter()
        for s, i in ranked:
            w = self.windows[i]
            if w.path == exclude_path or per_file[w.path] >= per_file_limit:
                continue
            if any(o.path == w.path and abs(o.start - w.start) < WINDOW for _, o in out):
                continue
            out.append((s, w))
            per_file[w.path] += 1
            if len(out) == limit:
                break
        return out


def build_header(count_tokens, hits: list[tuple[float, Window]], budget: int) -> tuple[str, list[Window]]:
    """Rendered snippets (best last) within `budget` tokens, and the windows used."""
    chosen: list[Window] = []
    used = 0
    for _, w in hits:  # best first: take while they fit
        n = count_tokens(w.render())
        if used + n > budget:
            continue
        chosen.append(w)
        used += n
    chosen.reverse()  # best nearest the code
    return "".join(w.render() for w in chosen), chosen


def fit_prefix(count_tokens, header: str, prefix: str, total: int) -> str:
    """The longest tail of `prefix` made of whole lines (plus the cursor's partial line) such that
    header + tail is at most `total` tokens."""
    lines = prefix.split("\n")  # last element: the cursor line up to the cursor
    lo, hi = 0, len(lines) - 1  # drop lines[:k]; find the smallest k that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(header + "\n".join(lines[mid:])) <= total:
            hi = mid
        else:
            lo = mid + 1
    return "\n".join(lines[lo:])
