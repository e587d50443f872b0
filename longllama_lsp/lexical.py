"""Lexical retrieval over memory chunks: which chunks of other files a completion's memory holds.

With `memory.retrieveTokens` set, a completion's repository memory is not every resident chunk but the
chunks of other files that best match the code before the cursor, by Okapi BM25 over identifiers (the
scoring peers' snippet retrieval uses: Tabby's code search, Continue's FTS5), up to that many tokens. The
memory layers then read retrieved code through their own attention (and the block selection within it),
where snippets pasted in the prompt would cost half of the local window. Why try it: the memory layers
were trained on memories of a few relevant chunks among look-alikes (finetune/retrieval_data.py), not
on 57k tokens of a whole repository. Measured (BENCHMARKS.md "Stop 32"): +0.013 +- 0.009 edit
similarity on 215 fresh holes at 2,048 tokens, +0.017 +- 0.009 at 4,096 (the default), every fresh set
non-negative.

Up to half of the budget goes first to chunks that define a name the code before the cursor uses or
imports (`wanted_definitions`; a chunk's index symbol says what it defines): BM25 over the last 20 lines
ranks chunks that use the same names above the one that defines the name about to be typed.

`longllama ask` retrieves the same way for its question (`Query.question`): the chunks that define or use
the names it asks about, instead of all of memory through the selection.

Chunk terms are kept by content hash (a chunk's text never changes under its hash), in one inverted index
across requests (ChunkRetriever).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from indexer.languages import named_suffixes

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPED = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*\Z")
MIN_PREFIX = 2  # a typed prefix this long stands for every indexed identifier it starts
QUERY_LINES = 20  # the query: identifiers of the last 20 lines before the cursor (RepoCoder's window)
# Up to this share of the retrieval budget goes first to chunks defining a name the code before the cursor
# uses or imports (wanted_definitions): BM25 over a 20-line window brings chunks that *use* the names near
# the cursor, and held the definition of a hole's cross-file name for 61 of 207 names on bench/crossfile's
# holes; with the share, 118 (bench/crossfile/definition_recall.py; BENCHMARKS.md "Stop 38").
DEFINITIONS_SHARE = 0.5
# wanted_definitions reads the first and the last this many characters before the cursor of a larger file:
# the import lines and the file's own definitions of a 4 MB file took ~0.2-0.4 s a completion, of 100 KB ~6 ms.
SCAN_CHARS = 1 << 17
_IMPORT_LINE = re.compile(  # an import statement: a line, or a parenthesized / braced list over several
    r"^[ \t]*(?:from[ \t]+\S+[ \t]+import[ \t]*\([^)]*\)|import[ \t]*\{[^}]*\}|use\b[^;\n]*\{[^}]*\}"
    r"|(?:from[ \t]+\S+[ \t]+import\b|import\b|use\b|#[ \t]*include\b).*$)", re.M)
_IMPORT_WORDS = frozenset({"from", "import", "as", "use", "include", "crate", "super", "self"})
_DEFINED_HERE = re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class|function|func|fn|struct|interface|type)[ \t]+"
                           r"([A-Za-z_][A-Za-z0-9_]*)", re.M)


def identifiers(text: str) -> list[str]:
    return _IDENT.findall(text)


def query_terms(text_before_cursor: str, lines: int = QUERY_LINES) -> Counter:
    """What a completion retrieves with: identifiers of the last `lines` lines before the cursor."""
    return Counter(identifiers("\n".join(text_before_cursor.rsplit("\n", lines)[-lines:])))


def wanted_definitions(text_before_cursor: str, query: Counter) -> frozenset[str]:
    """Names whose definitions a completion may want: those its `query` (query_terms of the same text: the
    last lines) uses and those the file's import lines before the cursor name (`from .utils import
    get_auth_from_url`, `use crate::a::{B, c}`), less those defined before the cursor in the file itself.
    Of a file longer than twice SCAN_CHARS, the first and the last SCAN_CHARS before the cursor are read."""
    names = set(query)
    scanned = _ends(text_before_cursor, SCAN_CHARS)
    for m in _IMPORT_LINE.finditer(scanned):
        names.update(identifiers(m.group(0)))
    return frozenset(names - _IMPORT_WORDS - defined_in(scanned))


def _ends(text: str, chars: int) -> str:
    """`text`, or its first and last `chars` (whole lines) when it is longer than twice that."""
    if len(text) <= 2 * chars:
        return text
    head, tail = text.rfind("\n", 0, chars), text.find("\n", len(text) - chars)
    return text[:max(head, 0)] + text[tail:]


# Words of a question that name nothing in code: left out of what `ask` retrieves with, so that "What is
# the ... ?" does not rank the chunks with the most comments and docstrings first.
_QUESTION_WORDS = frozenset("""a an and are as at be by can could do does did for from has have how i if in into
is it its me my of on or our should that the their them then there these this those to use used uses using
was we what when where which who whom whose why will with would you your
define defined defines file files function functions method methods value values return returns returned
set take takes variable constant about explain describe summarize summarise tell show please work works
happen happens here mean means class classes module modules attribute attributes parameter parameters argument
arguments""".split())


# A file a question names: a path or name with an extension of letters (`pricing.py`, `src/app.ts`); not a
# version (`2.32.3`), an abbreviation (`e.g.`) or a sentence's end.
_FILE_NAMED = re.compile(r"(?<![\w./-])[\w./-]*\w\w\.[A-Za-z][A-Za-z0-9]{0,7}(?![\w/-])")


_EXTENSIONS = frozenset(suffix[1:] for suffix in named_suffixes())  # the indexer's: one table of file kinds


def _without_extension(name: str) -> str:
    """`pricing.py` -> `pricing`; `Session.send` stays (a method, not a file's extension)."""
    stem, _, ext = name.rpartition(".")
    return stem if ext.lower() in _EXTENSIONS else name


def names_file(path: str, files: frozenset[str]) -> bool:
    """Whether `path` (a repository-relative file path) is one of `files` as a question names them: the
    path itself or its last parts (`utils.py`, `requests/utils.py`)."""
    return any(path == f.removeprefix("./") or path.endswith("/" + f.removeprefix("./")) for f in files)


@dataclass(frozen=True)
class Query:
    """What a request's memory is retrieved for (ChunkRetriever.top): identifier counts ranked by BM25, the
    name being typed (its completions share one term's weight), the names whose definitions come first,
    the files named (`pricing.py`, `src/app.ts`: their chunks before anything else).
    `whole_if_none`: when no chunk matches, memory stays whole instead of holding no other file (a
    question in words no code holds still reads the repository).
    `members`: a wanted name also brings the chunks nested in its definition (Candidate.within: a class's
    methods), for a question about a class; a completion wants the one name it uses (with members,
    definition recall on bench/crossfile fell from 201 to 128 of 356: definition_recall.py)."""

    terms: Counter
    prefix: str = ""
    definitions: frozenset[str] = frozenset()
    files: frozenset[str] = frozenset()
    whole_if_none: bool = False
    members: bool = False

    @classmethod
    def before_cursor(cls, text_before_cursor: str) -> Query:
        """A completion's: the last QUERY_LINES lines, the name being typed, wanted_definitions."""
        terms = query_terms(text_before_cursor)
        return cls(terms, typed_prefix(text_before_cursor), wanted_definitions(text_before_cursor, terms))

    @classmethod
    def question(cls, question: str) -> Query:
        """`ask`'s: the question's words but the question words (_QUESTION_WORDS, any case, unless in
        backticks: "What does `set` do?"), each a name whose definition comes first (`What does
        to_key_val_list return?` brings `def to_key_val_list`), and the files it names (`What does
        pricing.py do?` brings pricing.py; a source file's extension is no term, `Session.send`'s `send` is)."""
        files = frozenset(m.group(0) for m in _FILE_NAMED.finditer(question))
        words = _FILE_NAMED.sub(lambda m: _without_extension(m.group(0)), question)
        quoted = {w for span in re.findall(r"`([^`]+)`", words) for w in identifiers(span)}
        terms = Counter(w for w in identifiers(words) if w in quoted or w.lower() not in _QUESTION_WORDS)
        return cls(terms, definitions=frozenset(terms), files=files, whole_if_none=True, members=True)


def defined_in(text: str) -> frozenset[str]:
    """Names that definition lines in `text` define (`def f`, `class C`, `fn f`, `func f` ...): for chunks
    without an index symbol (the skill eval's token windows) and the open file's own names."""
    return frozenset(_DEFINED_HERE.findall(text))


def typed_prefix(text_before_cursor: str) -> str:
    """The identifier the cursor is in the middle of typing ("" if none): `Gre` in `g = Gre|`."""
    m = _TYPED.search(text_before_cursor[-256:])  # the whole text: a search from every position, 75 ms at 4 MB
    return m.group(0) if m else ""


@dataclass(frozen=True)
class Candidate:
    """A chunk that may be retrieved: its id, its content hash (its terms' key), its memory tokens, how to
    read its text when its terms are not cached (None: unreadable now), the names it defines (the
    index's chunk symbol: `Session.request` defines `request`), its file (repository-relative), and the
    names it is nested in (`Session.request` is within `Session`: Query.members)."""

    chunk_id: Hashable
    content_hash: str
    tokens: int
    read: Callable[[], str | None]
    defines: frozenset[str] = frozenset()
    path: str = ""
    within: frozenset[str] = frozenset()


def defined_by(symbol: str | None) -> frozenset[str]:
    """What a chunk with this index symbol defines, for Candidate.defines: the symbol's last part."""
    return frozenset({symbol.rsplit(".", 1)[-1]}) if symbol else frozenset()


def nested_in(symbol: str | None) -> frozenset[str]:
    """What a chunk with this index symbol is nested in, for Candidate.within: the parts before its last."""
    return frozenset(symbol.split(".")[:-1]) if symbol else frozenset()


class ChunkRetriever:
    """BM25 over candidate chunks' identifiers. The inverted index is kept by content hash across requests
    (at most `cache_chunks` contents, least recently used out), so a request only looks its candidates up:
    rebuilding it per request took ~1 s at 1M tokens (8,000 chunks), and every edit of the open file changes
    the candidate set. Document frequencies count the contents indexed so far (those of chunks evicted or
    edited away too, until they age out): a small bias, nothing a ranking of 20-line queries notices."""

    def __init__(self, cache_chunks: int = 1 << 16, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.cache_chunks = cache_chunks
        self._lengths: OrderedDict[str, int] = OrderedDict()  # content hash -> identifiers in it
        self._terms: dict[str, Counter] = {}  # content hash -> identifier counts
        self._postings: dict[str, dict[str, int]] = {}  # identifier -> {content hash: count}
        self._total = 0  # identifiers in every indexed content (for the average length)

    def top(self, candidates: Sequence[Candidate], query: Query, budget_tokens: int) -> set[Hashable]:
        """Ids of the best-scoring candidates (score > 0) whose tokens fit `budget_tokens` together, best
        first (one that does not fit is skipped, smaller ones after it may still fit). `query.prefix`: the
        name being typed; the identifiers it starts share one query term's weight (`Gre` finds `Greeter`).
        Candidates defining one of `query.definitions` come first, within DEFINITIONS_SHARE of the budget,
        ranked by the terms and those names (with `query.members`, also those within one, best first and
        then in order: a method need not repeat its class's name). Before them, the chunks of the files
        `query.files` names, within the same share, whether or not they share a term (best-matching first,
        then in order)."""
        terms, prefix = query.terms, query.prefix
        named = [c for c in candidates if query.files and names_file(c.path, query.files)]
        if named and budget_tokens > 0:
            first = self._filled(named, terms, int(budget_tokens * DEFINITIONS_SHARE))
            used = sum(c.tokens for c in named if c.chunk_id in first)
            rest = [c for c in candidates if c.chunk_id not in first]
            return first | self.top(rest, dataclasses.replace(query, files=frozenset()), budget_tokens - used)
        if budget_tokens <= 0 or not terms:
            return set()
        defining = [c for c in candidates if (c.defines | (c.within if query.members else frozenset()))
                    & query.definitions]
        if not defining:
            return self._best(candidates, terms, budget_tokens, prefix)
        share = int(budget_tokens * DEFINITIONS_SHARE)
        wanted = terms + Counter(query.definitions)
        first = self._filled(defining, wanted, share) if query.members else self._best(defining, wanted, share, prefix)
        used = sum(c.tokens for c in defining if c.chunk_id in first)
        rest = [c for c in candidates if c.chunk_id not in first]
        return first | self._best(rest, terms, budget_tokens - used, prefix)

    def _best(self, candidates: Sequence[Candidate], query: Counter, budget_tokens: int,
              prefix: str) -> set[Hashable]:
        by_hash: dict[str, list[Candidate]] = {}
        for c in candidates:
            if self.index(c):
                by_hash.setdefault(c.content_hash, []).append(c)
        scores = self._scores(self._expanded(query, prefix), by_hash)
        return _fitting([c for h in sorted(scores, key=lambda h: (-scores[h], h)) for c in by_hash[h]], budget_tokens)

    def _filled(self, candidates: Sequence[Candidate], terms: Counter, budget_tokens: int) -> set[Hashable]:
        """Ids of `candidates` that fit `budget_tokens`, the best-scoring for `terms` first, then in order."""
        scores = self._scores(terms, {c.content_hash for c in candidates if self.index(c)})
        order = sorted(range(len(candidates)), key=lambda i: (-scores.get(candidates[i].content_hash, 0.0), i))
        return _fitting([candidates[i] for i in order], budget_tokens)

    def _expanded(self, query: Counter, prefix: str) -> Counter:
        if len(prefix) < MIN_PREFIX:
            return query
        names = [t for t in self._postings if t.startswith(prefix) and t != prefix]
        out = Counter(query)
        for t in names:
            out[t] += 1 / len(names)
        return out

    def _scores(self, query: Counter, wanted: Iterable[str]) -> dict[str, float]:
        wanted = set(wanted)
        n_docs = len(self._lengths)
        avg = self._total / max(1, n_docs)
        out: dict[str, float] = {}
        for t, qn in query.items():
            posting = self._postings.get(t)
            if not posting:
                continue
            idf = math.log((n_docs - len(posting) + 0.5) / (len(posting) + 0.5) + 1.0)
            for h, n in posting.items():
                if h in wanted:
                    norm = self.k1 * (1 - self.b + self.b * self._lengths[h] / max(avg, 1e-9))
                    out[h] = out.get(h, 0.0) + idf * n * (self.k1 + 1) / (n + norm) * qn
        return out

    def known(self, content_hash: str) -> bool:
        """Whether a content's terms are indexed (nothing is read)."""
        return content_hash in self._lengths

    def full(self) -> bool:
        return len(self._lengths) >= self.cache_chunks

    def index(self, c: Candidate) -> bool:
        """Whether `c`'s content is in the index (read and added now if need be)."""
        if c.content_hash in self._lengths:
            self._lengths.move_to_end(c.content_hash)
            return True
        text = c.read()
        if text is None:  # unreadable now (a file mid-write) may be readable on the next request
            return False
        terms = Counter(identifiers(text))
        self._terms[c.content_hash] = terms
        self._lengths[c.content_hash] = n = sum(terms.values())
        self._total += n
        for t, k in terms.items():
            self._postings.setdefault(t, {})[c.content_hash] = k
        while len(self._lengths) > self.cache_chunks:
            self._forget(next(iter(self._lengths)))
        return True

    def _forget(self, content_hash: str) -> None:
        self._total -= self._lengths.pop(content_hash)
        for t in self._terms.pop(content_hash):
            posting = self._postings[t]
            del posting[content_hash]
            if not posting:
                del self._postings[t]


def _fitting(ordered: Iterable[Candidate], budget_tokens: int) -> set[Hashable]:
    """Ids of the candidates taken in order while they fit `budget_tokens` (one that does not is skipped)."""
    chosen: set[Hashable] = set()
    used = 0
    for c in ordered:
        if used + c.tokens <= budget_tokens:
            chosen.add(c.chunk_id)
            used += c.tokens
    return chosen
