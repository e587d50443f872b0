"""The memory of one request, and the way back from attended memory slots to chunks of code.

A request's memory is one Memory (B=1) concatenated along M from segments:

    slots |  bank of repository 1 (minus this file) | bank 2 ... | block 1 | block 2 | ...
          |<--------- Segment(bank=...) ----------->|           |<- Segment(block=...) ->|

Bank segments map a slot to its chunk with `bank.slot_owner`; buffer blocks are stretches of the
open file (prompt.Block) encoded with `model.encode_memory` and cached by token hash. The result
is cached while every bank's `version` and the block list stay the same.

Copy or view: when the model attends densely (no `select_tokens`, or memory within it), the
segments are copied into one memory in the compute dtype (attention then reads all of it without
a cast per step). When it selects blocks (sparse), a lone bank is handed over as the bank's own
views, summaries included: at 1M tokens a copy would move 2.4 GB per change of the open file. The
repository's lock is then held until the request ends (`request()`), so the indexer cannot move
slots under it; several segments are joined block-aligned in the storage dtype, summaries kept.

Retrieval (`retrieve_tokens`, setting memory.retrieveTokens): a completion's banks hold only the chunks of
other files that best match the code before the cursor (lexical.py), an answer's those that best match its
question's names, up to that many tokens; the rest
are masked out as the open file's stale chunks are. The open file's own chunks are always there.
Ranking needs the chunks' texts: after each indexing pass the engine reads them in the background
(`warm`), so the first completion does not (a read of ~1.4 s at 1M tokens, tens of ms at flask's 616
chunks).

Only the engine's worker thread uses an Assembler.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .lexical import Candidate, ChunkRetriever, Query, defined_by, nested_in
from .prompt import Block
from .repository import Bank, BufferChunk, MemorySource

WARM_CHUNKS = 256  # chunk texts read per warm-up job: ~50 ms, what a keystroke may wait behind it

if TYPE_CHECKING:  # torch loads with the model, not with this module (see engine.py)
    import torch

    from .model.memory import Memory


@dataclass(frozen=True)
class Source:
    """A chunk of memory the output attended to; weight = share of all attention (0..1)."""

    path: str
    start_line: int
    end_line: int
    symbol: str | None
    weight: float
    file: str | None = None  # absolute path when known

    @property
    def location(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"


@dataclass
class Segment:
    """A run of memory slots [start, start + length) from one bank or one buffer block."""

    start: int
    length: int
    bank: Bank | None = None
    root: Path | None = None
    repo: MemorySource | None = None  # the bank's repository (its chunk texts)
    block: Block | None = None
    # The buffer's own path: blocks exist only for a file no repository (of the request) holds, so it is
    # not shown relative to one.
    file: str | None = None


@dataclass(frozen=True)
class Definition:
    """Where the index defines a name a question names (Assembler.defined): its chunk as a Source (weight 0),
    its definition line(s) as the file has them, and the names defined inside it (a class's methods)."""

    source: Source
    line: str
    members: tuple[str, ...] = ()


@dataclass
class Assembled:
    memory: Memory | None
    segments: list[Segment]
    views: bool = False  # memory aliases a bank: valid only while its lock is held (Assembler.request)
    # (M,) int64: the token after each memory slot's, -1 where unknown or hidden (`assemble(next_tokens=True)`)
    next_ids: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.memory.num_tokens if self.memory is not None else 0


NOTHING = Assembled(None, [])


@dataclass(frozen=True)
class Buffer:
    """A request's open file: its text and, for a completion, the local window [window_start, cursor)
    (code points). cursor None: no window (a question about the file)."""

    text: str
    window_start: int = 0
    cursor: int | None = None


class TokenIds:
    """Chunk token ids by content hash (the kNN lookup's next_ids), at most `limit` tokens in all: the least
    recently read go first. A warm-up adds only while there is room (`has_room`): it must not push out what a
    completion read a moment ago."""

    def __init__(self, limit: int):
        self.limit = limit
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._total = 0

    def __bool__(self) -> bool:
        return bool(self._ids)

    def get(self, content_hash: str) -> list[int] | None:
        ids = self._ids.get(content_hash)
        if ids is not None:
            self._ids.move_to_end(content_hash)
        return ids

    def has_room(self) -> bool:
        return self._total < self.limit

    def put(self, content_hash: str, ids: list[int]) -> None:
        self._total += len(ids) - len(self._ids.pop(content_hash, ()))
        self._ids[content_hash] = ids
        while self._total > self.limit and len(self._ids) > 1:
            self._total -= len(self._ids.popitem(last=False)[1])

    def clear(self) -> None:
        self._ids.clear()
        self._total = 0


class Assembler:
    """Builds request memories from repositories (repository.MemorySource, read through the
    `repositories` provider per request) and blocks."""

    def __init__(self, encode: Callable[[list[int]], Memory], device: torch.device | str,
                 repositories: Callable[[], Sequence[MemorySource]], cache_tokens: int = 1 << 17,
                 dtype: torch.dtype | None = None, select_tokens: Callable[[], int | None] = lambda: None,
                 tokenize: Callable[[str, str], tuple[list[int], int]] | None = None, edited_tokens: int = 8192,
                 retrieve_tokens: Callable[[], int] = lambda: 0, token_cache: int = 1 << 18,
                 keep_next_ids: Callable[[], bool] = lambda: True):
        self.encode, self.device, self.repositories = encode, device, repositories
        self.retrieve_tokens = retrieve_tokens  # other files' tokens a completion's memory holds (0: all)
        self._retriever = ChunkRetriever()
        self._unreadable: set[str] = set()  # content hashes a warm-up could not read (`warm`)
        # The dense copy is made in the compute dtype: attention then skips a cast of all of memory
        # per decode step (bf16 -> fp32 on CPU: 270 -> 197 ms/step at 42k memory tokens, SmolLM2).
        self.dtype = dtype
        self.select_tokens = select_tokens  # the model's sparse budget now (None: dense)
        # (chunk text, context) -> (ids: the context's tail then the text, where the text's begin), as the
        # indexer's encoder builds a row (indexer.encoder.Encoder.encode)
        self.tokenize = tokenize
        self.edited_tokens = edited_tokens  # most tokens of edited buffer chunks encoded, nearest the cursor first
        self.cache_tokens = cache_tokens
        self._token_ids = TokenIds(token_cache)  # content hash -> a chunk's ids (next_ids)
        self.keep_next_ids = keep_next_ids  # whether a warm-up keeps the ids it reads (the kNN lookup is on)
        self._blocks: OrderedDict[str, Memory] = OrderedDict()  # encoded blocks and edited chunks by key
        self._block_tokens = 0
        self._chunked: OrderedDict[tuple, Sequence[BufferChunk]] = OrderedDict()  # (repo, path, text) -> chunks
        # Edited chunks the last deferring request left out, nearest its cursor first (`encode_deferred`).
        self.deferred: deque[BufferChunk] = deque()
        self._last: tuple[tuple, Assembled] | None = None
        self._held: contextlib.ExitStack | None = None  # the banks' locks while a request uses views

    @contextlib.contextmanager
    def request(self):
        """One request's span: bank views assembled inside it stay valid (their locks held) until it ends."""
        with contextlib.ExitStack() as held:
            self._held = held
            try:
                yield
            finally:
                self._held = None

    def home(self, path: str | None, roots: Collection[Path] | None = None) -> tuple[MemorySource, str] | None:
        """The repository (of `roots`; None: any) that holds the file `path` (absolute, as an editor names
        it) and the file's path in it: its bank stands for the file's open buffer (`assemble`)."""
        return _home(path, self._placed(path, roots))

    def _placed(self, path: str | None, roots: Collection[Path] | None) -> list[tuple[MemorySource, Path, str | None]]:
        """(repository, resolved root, `path` relative to that root or None) of each repository of `roots`."""
        out = []
        for repo in self.repositories():
            root = Path(repo.root).resolve()
            if roots is None or root in roots:
                out.append((repo, root, relative(path, root)))
        return out

    def assemble(self, path: str | None, blocks: Sequence[Block], roots: Collection[Path] | None = None,
                 buffer: Buffer | None = None, defer_edits: bool = False,
                 retrieve: Callable[[], Query] | None = None, next_tokens: bool = False) -> Assembled:
        """Every bank + `blocks`, with the slot map. `roots` (resolved paths): only the banks of those
        repositories (a TCP session reads its own roots, never another editor's); None: every bank.

        With `buffer` (the open text of `path`), the banks leave out `path`'s indexed chunks (the buffer
        is newer), and when `path` is inside a repository (`home`), that repository's bank stands for the
        buffer instead of `blocks` (see `_buffer_in_bank`). `defer_edits`: edited chunks not encoded yet
        are left out and become `deferred` (a keystroke's completion must not wait for their encoding).
        `retrieve`: with retrieve_tokens() > 0, other files' chunks are only the best for the Query it builds
        (`_retrieve`; built only then: a completion's reads the text before the cursor). `next_tokens`: the
        result's `next_ids` are set (the token after each visible slot; for knn.py)."""
        if defer_edits:  # the latest buffer replaces earlier keystrokes' (those states are gone)
            self.deferred = deque()
        placed = self._placed(path if buffer is not None else None, roots)  # without a buffer nothing is left out
        home = _home(path, placed)
        # the buffer cut as the indexer cuts files (a parse of all of it), before the locks the indexer waits on
        chunks = self._chunks(*home, buffer.text) if home is not None else ()
        used = [(repo, root, rel) for repo, root, rel in placed if len(repo.bank) or home and repo is home[0]]
        with contextlib.ExitStack() as locks:  # views alias the banks: read them while the indexer waits
            for repo, _, _ in used:
                locks.enter_context(repo.lock)
            banks = []  # (bank, root, what is left out of it: (paths, chunk ids), its repository)
            for repo, root, rel in used:
                hidden = ((), self._buffer_in_bank(repo, rel, buffer, chunks, defer_edits)) \
                    if home and repo is home[0] else ((rel,) if rel else (), ())
                banks.append((repo.bank, root, hidden, repo))
            if retrieve is not None and self.retrieve_tokens() > 0:
                banks = self._retrieve([(repo, rel) for repo, _, rel in used], banks, retrieve())
            if home is not None:
                blocks = ()
            key = tuple((id(bank), bank.version, hidden) for bank, _, hidden, _ in banks) + tuple(b.key for b in blocks)
            key += (self.select_tokens(),)
            if self._last is not None and self._last[0] == key:
                out = self._last[1]
            else:
                out = self._build(path, blocks, banks)
                self._last = (key, out)
            if next_tokens and out.next_ids is None and out.memory is not None:
                out.next_ids = self._next_ids(out)  # under the locks: the slots' chunks are as built
            if out.views and self._held is not None:
                self._held.enter_context(locks.pop_all())  # released when the request ends
            elif out.views:
                raise RuntimeError("bank views outside Assembler.request()")
        return out

    def _retrieve(self, placed: Sequence[tuple[MemorySource, str | None]], banks: list, query: Query) -> list:
        """`banks` with every chunk of other files left out but the best `retrieve_tokens` for `query` (one
        BM25 ranking over all banks; none matching and `query.whole_if_none`: `banks` as they are). Runs
        under the repositories' locks."""
        candidates = []  # ids (bank index, chunk id): two stores may number their chunks alike
        for i, ((repo, rel), (bank, _, (paths, chunks), _)) in enumerate(zip(placed, banks, strict=True)):
            hidden = set(chunks)
            for cid, meta in bank.resident().items():
                if meta.path != rel and meta.path not in paths and cid not in hidden:
                    candidates.append(Candidate((i, cid), meta.content_hash, len(bank.chunk_slots(cid)),
                                                _reader(repo, meta), defined_by(meta.symbol), meta.path,
                                                nested_in(meta.symbol)))
        chosen = self._retriever.top(candidates, query, self.retrieve_tokens())
        if not chosen and query.whole_if_none:
            return banks
        left_out: list[list[Hashable]] = [[] for _ in banks]
        for c in candidates:
            if c.chunk_id not in chosen:
                left_out[c.chunk_id[0]].append(c.chunk_id[1])
        return [(bank, root, (paths, tuple(chunks) + tuple(sorted(more, key=repr))), repo)
                for (bank, root, (paths, chunks), repo), more in zip(banks, left_out, strict=True)]

    def warm(self, limit: int = WARM_CHUNKS, restart: bool = False) -> bool:
        """Read the texts of up to `limit` resident chunks retrieval has not indexed yet (their terms, for
        `_retrieve`); returns whether more remain. Without it the first completion after a repository is
        indexed reads every chunk's text itself: 1-2 s at 1M tokens, under the repository's lock. A chunk
        unreadable now is skipped until the next warm-up (`restart`; a completion tries it again)."""
        if restart:
            self._unreadable.clear()
        if self.retrieve_tokens() <= 0:
            return False
        pending: list[Candidate] = []
        for repo in self.repositories():
            with repo.lock:  # the resident map changes under the indexer; reading the files needs no lock
                for cid, meta in repo.bank.resident().items():
                    if not self._retriever.known(meta.content_hash) and meta.content_hash not in self._unreadable:
                        pending.append(Candidate(cid, meta.content_hash, 0, self._keeping_ids(meta, _reader(repo, meta))))
                    if len(pending) > limit:
                        break
            if len(pending) > limit:
                break
        for c in pending[:limit]:
            if self._retriever.full():
                return False  # warming more would only push out contents read a moment ago
            if not self._retriever.index(c):
                self._unreadable.add(c.content_hash)
        return len(pending) > limit

    def _buffer_in_bank(self, repo: MemorySource, rel: str, buffer: Buffer, chunks: Sequence[BufferChunk],
                        defer_edits: bool = False) -> tuple:
        """Make `repo`'s bank hold the open buffer of `rel`; returns the chunk ids to leave out (sorted).

        Cut as the indexer cuts the file (`chunks`, see `_chunks`), a buffer chunk with an indexed chunk's
        memory key uses that chunk's memory as it is: opening a file or moving the cursor encodes nothing. So
        does one with an indexed chunk's text after edited text above it (its memory was encoded after the old
        context: near enough, where re-encoding every chunk below an edit would cost an encode per key). An
        edited chunk is encoded once (cached by memory key) and added to the bank beside the indexed ones
        (`_add_edited`; with `defer_edits`, by a later request), unless it holds the cursor (it changes with
        every key; the local window has its text). Chunks wholly inside the local window are left out (the
        prompt has them), and so are the file's indexed chunks the buffer no longer has. Runs under the
        repository's lock."""
        bank = repo.bank
        resident = bank.chunks_of(rel)
        by_key: dict[str, Hashable] = {}
        by_text: dict[str, Hashable] = {}
        for cid, meta in resident.items():
            by_key.setdefault(meta.memory_key, cid)
            by_text.setdefault(meta.content_hash, cid)
        keep: set[Hashable] = set()
        edited = []
        for c in chunks:
            if buffer.cursor is not None and buffer.window_start <= c.start and c.end <= buffer.cursor:
                continue  # wholly in the local window
            cid = by_key.get(c.memory_key, by_text.get(c.content_hash))
            if cid is not None:
                keep.add(cid)
            elif buffer.cursor is None or not c.start <= buffer.cursor <= c.end:
                edited.append(c)
        if buffer.cursor is not None:  # the nearest edits first, within edited_tokens
            edited.sort(key=lambda c: min(abs(c.start - buffer.cursor), abs(c.end - buffer.cursor)))
        keep |= self._add_edited(bank, rel, edited, defer_edits)
        current = {c.memory_key for c in chunks}
        for cid, meta in resident.items():  # edits the buffer no longer has
            if cid not in keep and isinstance(cid, tuple) and cid[:1] == ("buffer",) \
                    and meta.memory_key not in current:
                bank.remove(cid)
        return tuple(sorted((cid for cid in bank.chunks_of(rel) if cid not in keep), key=repr))

    def _add_edited(self, bank: Bank, rel: str, edited: Sequence[BufferChunk], defer_edits: bool
                    ) -> set[Hashable]:
        """Add the `edited` chunks of `rel` (in order, within edited_tokens) to `bank`; returns their ids.

        With `defer_edits`, a chunk whose memory is not cached yet is left out and queued in `deferred`:
        typing one line in a long function shifts the chunk boundaries near the cursor, and encoding those
        chunks (up to edited_tokens) held a keystroke's completion for seconds. `encode_deferred` encodes
        them after it; the next request finds them cached and adds them here."""
        added: set[Hashable] = set()
        spent = 0
        for c in edited:
            spent += c.token_count
            if spent > self.edited_tokens:
                break
            cid = ("buffer", rel, c.memory_key)
            if cid in bank:
                added.add(cid)
            elif defer_edits and c.memory_key not in self._blocks:
                self.deferred.append(c)
            elif bank.add(cid, self._cached(c.memory_key, c.text, c.context), dataclasses.replace(c, id=cid),
                          c.memory_key):
                added.add(cid)
        return added

    def encode_deferred(self) -> bool:
        """Encode the first `deferred` chunk into the cache, not the bank (a request adds it under the
        repository's lock, or drops it if the buffer moved on); returns whether more remain."""
        while self.deferred:
            c = self.deferred.popleft()
            if c.memory_key not in self._blocks:
                self._cached(c.memory_key, c.text, c.context)
                break
        return bool(self.deferred)

    def _chunks(self, repo: MemorySource, rel: str, text: str) -> Sequence[BufferChunk]:
        key = (id(repo), rel, text)
        chunks = self._chunked.get(key)
        if chunks is None:
            chunks = self._chunked[key] = repo.chunk(rel, text)
            while len(self._chunked) > 8:
                self._chunked.popitem(last=False)
        return chunks

    def _build(self, path: str | None, blocks: Sequence[Block], banks: list) -> Assembled:
        parts = []
        for bank, root, (paths, chunks), repo in banks:
            mem = bank.memory(exclude_paths=paths, exclude_chunks=chunks)
            if mem.num_tokens:
                parts.append((mem, Segment(0, 0, bank=bank, root=root, repo=repo)))
        parts += [(self.block_memory(b), Segment(0, 0, block=b, file=path)) for b in blocks]
        if not parts:
            return NOTHING
        total = sum(m.num_tokens for m, _ in parts)
        budget = self.select_tokens()
        sparse = budget is not None and total > budget
        views = sparse and len(parts) == 1 and parts[0][1].bank is not None
        if views:
            memory = parts[0][0]
        else:  # a copy: dense in the compute dtype, sparse in the storage dtype (selected blocks are cast)
            memory = concat([m for m, _ in parts], self.device, copy=bool(banks), dtype=None if sparse else self.dtype)
        offset = 0
        for mem, seg in parts:
            seg.start, seg.length, offset = offset, mem.num_tokens, offset + mem.num_tokens
        return Assembled(memory, [seg for _, seg in parts], views)

    def _next_ids(self, asm: Assembled) -> torch.Tensor:
        """(M,) int64: the token after each visible slot's; -1 where hidden, at a chunk's last slot, for a chunk
        whose text no longer tokenizes to its slots, and everywhere when over knn.MAX_TOKENS slots are visible.
        A chunk's slots hold its text's tokens alone (its context is encoded before it and dropped:
        indexer.encoder), so its text says them."""
        import torch

        from .knn import MAX_TOKENS, following
        from .model.memory import MASK_MIN

        out = torch.full((asm.memory.num_tokens,), -1, dtype=torch.int64)
        visible = next(iter(asm.memory.values())).mask[0, 0, :, 0].cpu() > MASK_MIN / 2  # (M,)
        if int(visible.sum()) > MAX_TOKENS:
            return out  # no lookup (knn.MAX_TOKENS): no chunk text is read
        for seg in asm.segments:
            if seg.block is not None:
                ids = list(seg.block.ids)
                out[seg.start:seg.start + len(ids)] = following(ids)
                continue
            for cid, meta in seg.bank.resident().items():
                slots = seg.bank.chunk_slots(cid)
                first = seg.start + slots.start
                if not len(slots) or not visible[first]:
                    continue
                ids = self._chunk_token_ids(meta, seg.repo)
                if ids is not None and len(ids) == len(slots):
                    out[first:first + len(ids)] = following(ids)
        return out

    def _chunk_token_ids(self, meta: Any, repo: MemorySource | None) -> list[int] | None:
        """A resident chunk's token ids (its memory slots'), cached by content hash; None if unreadable."""
        ids = self._token_ids.get(meta.content_hash)
        if ids is not None:
            return ids
        text = _reader(repo, meta)() if repo is not None or isinstance(meta, BufferChunk) else None
        if text is None or self.tokenize is None:
            return None
        ids, _ = self.tokenize(text, "")  # a chunk's own tokens: as the encoder cuts them, no context
        self._token_ids.put(meta.content_hash, ids)
        return ids

    def _keeping_ids(self, meta: Any, read: Callable[[], str | None]) -> Callable[[], str | None]:
        """`read`, also keeping the text's token ids while the cache has room and completions want them (a
        warm-up reads the chunk texts once: the first completion then reads none for its `next_ids` either)."""
        if not self.keep_next_ids():
            return read

        def read_and_keep() -> str | None:
            text = read()
            if text is not None and self.tokenize is not None and self._token_ids.has_room():
                self._token_ids.put(meta.content_hash, self.tokenize(text, "")[0])
            return text
        return read_and_keep

    def block_memory(self, block: Block) -> Memory:
        return self._cached(block.key, block.ids)

    def _cached(self, key: str, content: str | Sequence[int], context: str = "") -> Memory:
        """The memory of a buffer block (ids) or an edited chunk (text, encoded after `context` as the indexer
        encodes it), encoded once per key."""
        mem = self._blocks.get(key)
        if mem is not None:
            self._blocks.move_to_end(key)
            return mem
        if isinstance(content, str):
            import torch

            ids, start = self.tokenize(content, context)
            mem = self.encode(ids)  # (1, Hkv, len(ids), D) per layer
            if start:  # the context's slots go: the chunk's memory is its own tokens'
                mem = mem.select(torch.arange(start, len(ids), device=next(iter(mem.values())).keys.device))
        else:
            mem = self.encode(list(content))
        self._blocks[key] = mem
        self._block_tokens += mem.num_tokens
        while self._block_tokens > self.cache_tokens and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._block_tokens -= old.num_tokens
        return mem

    def sources(self, attention: torch.Tensor | None, norm: float, asm: Assembled, top: int = 5,
                named: frozenset[str] = frozenset()) -> list[Source]:
        """Top chunks by attention share; attention: (M,) mass per slot, norm: queries * heads * layers.
        A chunk's share leaves its first slot out: the first token of a file's first chunk, encoded with
        nothing before it, is an attention sink (a fifth of all memory attention in one slot, on `longllama
        ask` over starlette), and made whichever file's import block was in memory the top source.
        Chunks that define a name in `named` (a question's names) and were read at all come first: asked
        "Which file defines retry_if_exception_type?", tenacity's five top sources used it and its class was
        sixth (2.7% of attention against 2.9%)."""
        if attention is None or not norm or not asm.segments:
            return []
        import torch

        share = attention / norm  # (M,)
        found = _defining(share, asm, named) if named else {}
        starts = [s.start for s in asm.segments]
        for slot in torch.topk(share, min(64, share.shape[0])).indices.tolist():
            seg = asm.segments[bisect.bisect_right(starts, slot) - 1]
            src_key, src = _source_of(seg, slot, share)
            if src is not None and src_key not in found:
                found[src_key] = src
        ranked = sorted(found.values(), key=lambda s: (bool(defined_by(s.symbol) & named), s.weight), reverse=True)
        return [s for s in ranked if s.weight > 0][:top]

    @staticmethod
    def defined(asm: Assembled, named: frozenset[str], most: int = 4) -> list[Definition]:
        """Where `asm`'s banks define a name in `named` (a question's names), in file order, at most `most`,
        with the definition's line and members: a question's prompt says them, since memory holds code and
        not the paths of its files (asked "Which file defines retry_if_exception_type?", the model named a
        file that does not exist)."""
        found = sorted(((meta, seg) for seg, _, meta in _named_chunks(asm, named) if seg.repo is not None),
                       key=lambda found: (found[0].path, found[0].start_line))
        return [_definition(seg, meta) for meta, seg in found[:most]]


def _named_chunks(asm: Assembled, named: frozenset[str]) -> Iterator[tuple[Segment, Hashable, Any]]:
    """(segment, chunk id, row) of the banks' chunks that define a name in `named` (their index symbol's last
    part): Assembler.sources puts them first, Assembler.defined says where they are."""
    for seg in asm.segments if named else ():
        if seg.bank is not None:
            for chunk_id, meta in seg.bank.resident().items():
                if defined_by(meta.symbol) & named:
                    yield seg, chunk_id, meta


def _definition(seg: Segment, meta: Any) -> Definition:
    """A bank chunk as a Definition: its text read back (or an edited buffer chunk's own) for its line."""
    assert seg.bank is not None and seg.repo is not None  # Assembler.defined reads bank segments only
    text = _reader(seg.repo, meta)() or ""
    return Definition(_chunk_source(seg, meta, 0.0), definition_line(text, meta.symbol),
                      members_of(meta.symbol, seg.bank.resident().values()))


def definition_line(text: str, symbol: str, most_lines: int = 6) -> str:
    """The line of a chunk's `text` that defines `symbol`'s last part (`def f(`, `class C`), with the lines
    it goes on over up to one ending with `:`, `{` or `;` (a signature black broke), whitespace collapsed;
    "" if no line names it."""
    name = symbol.rsplit(".", 1)[-1]
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.search(rf"\b{re.escape(name)}\b", line):
            end = next((j for j in range(i, min(i + most_lines, len(lines)))
                        if lines[j].rstrip().endswith((":", "{", ";"))), i)
            return " ".join(" ".join(lines[i:end + 1]).split())[:240]
    return ""


def members_of(symbol: str, chunks: Iterable[Any], most: int = 12) -> tuple[str, ...]:
    """The names chunks define directly inside `symbol` (a class's methods: `C.f` for `C`), in file order."""
    head = symbol + "."
    inside = sorted((m.start_line, m.symbol[len(head):]) for m in chunks
                    if m.symbol and m.symbol.startswith(head) and "." not in m.symbol[len(head):])
    return tuple(dict.fromkeys(n for _, n in inside))[:most]


def _defining(share: torch.Tensor, asm: Assembled, named: frozenset[str]) -> dict[Any, Source]:
    """The sources (as _source_of keys them) of the banks' chunks that define a name in `named`."""
    found: dict[Any, Source] = {}
    for seg, chunk_id, _ in _named_chunks(asm, named):
        slots = seg.bank.chunk_slots(chunk_id)
        if slots is not None:
            key, src = _source_of(seg, seg.start + slots.start, share)
            if src is not None:
                found[key] = src
    return found


def _source_of(seg: Segment, slot: int, share: torch.Tensor) -> tuple[Any, Source | None]:
    """The chunk holding `slot` and its share: a whole buffer block, or a bank chunk (all its slots)."""
    if seg.block is not None:
        w = float(share[seg.start + 1:seg.start + seg.length].sum())  # less its first slot (Assembler.sources)
        return ("buf", seg.start), Source(seg.file or "<buffer>", seg.block.start_line, seg.block.end_line,
                                          None, w, seg.file)
    meta = seg.bank.slot_owner(slot - seg.start)
    if meta is None:
        return None, None
    chunk_id = getattr(meta, "id", None)
    slots = seg.bank.chunk_slots(chunk_id) if chunk_id is not None else None
    w = float(share[seg.start + slots.start + 1:seg.start + slots.stop].sum()) if slots else float(share[slot])
    return (id(seg.bank), chunk_id, meta.path, meta.start_line), _chunk_source(seg, meta, w)


def _chunk_source(seg: Segment, meta: Any, weight: float) -> Source:
    """A bank chunk as a Source: its path in its repository, the file's absolute path when the root is known."""
    return Source(meta.path, meta.start_line, meta.end_line, getattr(meta, "symbol", None), weight,
                  str(seg.root / meta.path) if seg.root is not None else None)


def _reader(repo: MemorySource, meta: Any) -> Callable[[], str | None]:
    """How to read a resident chunk's text: an edited buffer chunk holds it, an indexed one is read back."""
    if isinstance(meta, BufferChunk):
        return lambda: meta.text
    return lambda: repo.chunk_text(meta)


def _home(path: str | None, placed: Sequence[tuple[MemorySource, Path, str | None]]
          ) -> tuple[MemorySource, str] | None:
    """The first of the `placed` repositories (see `Assembler._placed`) holding the file `path` (absolute)."""
    if path and Path(path).is_absolute():
        return next(((repo, rel) for repo, _, rel in placed if rel is not None), None)
    return None


def relative(path: str | None, root: Path) -> str | None:
    """`path` relative to the repository root, POSIX style (how the bank names files); None if outside."""
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(root).as_posix()
    except ValueError:
        return None


def concat(parts: Sequence[Memory], device: torch.device | str, copy: bool = True,
           dtype: torch.dtype | None = None) -> Memory:
    """Memories (B=1) along M on `device` in `dtype` (default: as stored), masks as float32; block
    summaries are kept when every part but the last is block-aligned (banks are), see MemCache.concat.

    copy=False lets a single part through as it is (an encoded block, which nothing else changes).
    """
    import torch

    from .model.memory import MemCache, Memory

    parts = [p for p in parts if len(p)]
    if len(parts) == 1 and not copy and (dtype is None or parts[0][next(iter(parts[0]))].keys.dtype == dtype):
        return parts[0]
    out = {}
    for i in list(parts[0]):
        caches = [p[i].to(device, dtype) for p in parts]
        caches = [MemCache(c.keys, c.values, c.mask.to(torch.float32), c.summary, c.block_ids) for c in caches]
        out[i] = MemCache.concat(caches)  # torch.cat: always a copy
    return Memory(out)
