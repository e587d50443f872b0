"""The memory bank: every chunk's memory resident on the device, ready to hand to the model.

Layout, per memory layer (one slot = one memory token):

    keys[layer], values[layer]   (Hkv, C, D)   C = capacity, grows geometrically
    mask                         (C,) float32   0 = live slot, MASK_MIN = free or padding
    owner (CPU)                  (C,) int64     slot -> chunk handle, -1 = free

          0          end                    C
    slots |AAAA..BBBCC|.....................|    '.' = free range (on the free list)

Chunks take the first free range that fits (first-fit), else the slots after `end`. Removing a
chunk masks its slots and returns them to the free list, so add/remove cost O(chunk tokens).
When free slots below `end` exceed `compact_threshold` of `end`, live slots are moved together
(amortised O(1) per freed token). `memory()` returns views of slots [0, end), masked holes
included, so a request copies nothing; excluding chunks copies only the (end,) mask.

Sparse memory (block_size set, as `for_store` does): every chunk starts on a block boundary and
takes whole blocks (the tail of its last block is masked padding), so no block mixes two chunks;
each block's Quest summary (elementwise min/max of its keys, (Hkv, C / block_size, D) per layer)
is computed once when the chunk is added, moved with it on compaction, and handed to the model
with `memory()`, which then never summarises the memory itself. Keys and values may live in host
memory (`kv_device="cpu"` with a GPU `device`: the host tier); masks and summaries stay on
`device`, and sparse attention reads only the blocks it selects.

Views alias the bank: a returned Memory is valid until the next add/remove/compact. The bank is not
thread-safe: its indexer changes it holding `Indexer.lock`, and the engine copies the views under
that lock (longllama_lsp/assembly.py).

Budget (`budget_tokens`): when adding would exceed it, chunks of lower priority are evicted, or the
new chunk is dropped if nothing lower is resident. Priority, highest first:
  1. files touched (opened/edited, `touch(path)`), most recent first;
  2. files in the directory of a touched file, most recent first;
  3. non-test code before test code (tests/, test_*.py, *_test.*, *.spec.* ...);
  4. earlier chunks of a file before later ones, so every file keeps its head (imports,
     class headers) before any file keeps its tail.
Priorities only ever rise (touch), which keeps the lazy eviction heap exact.
"""

from __future__ import annotations

import bisect
import heapq
import posixpath
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from indexer.schema import ChunkRow
from longllama_lsp.model.memory import DEFAULT_BLOCK_SIZE, MASK_MIN, BlockIds, BlockSummary, MemCache, Memory

_TEST_PATH = re.compile(r"(^|/)(tests?|__tests__|spec)/|(^|/)test_[^/]*$|_test\.[^/]*$|\.(test|spec)\.[^/]*$")


def is_test_path(path: str) -> bool:
    return bool(_TEST_PATH.search(path))


@dataclass
class _Entry:
    start: int
    n: int
    meta: Any
    handle: int
    span: int  # slots taken: n rounded up to whole blocks
    content: int = -1  # the chunk's content, interned (equal content, equal memory); -1 = unknown


@dataclass
class BankStatus:
    layers: list[int]
    live_chunks: int
    live_tokens: int
    span_tokens: int  # slots [0, end) handed to the model, holes included
    capacity_tokens: int
    fragmentation: float  # free slots below end / end
    budget_tokens: int | None
    evicted_chunks: int  # currently not resident because of the budget
    evicted_tokens: int
    evictions: int  # chunks evicted or dropped since creation
    device_bytes: int
    host_bytes: int = 0  # keys/values kept in host memory (the host tier)


class MemoryBank:
    """Per-layer device tensors holding chunk memories; see the module docstring for the layout."""

    def __init__(self, layers: Iterable[int], kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity_tokens: int | None = None,
                 budget_tokens: int | None = None, compact_threshold: float = 0.25,
                 block_size: int | None = None, kv_device: torch.device | str | None = None):
        self.layers = sorted(int(i) for i in layers)
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.kv_device = self.device if kv_device is None else torch.device(kv_device)
        self.block_size = block_size  # None: no summaries, chunks packed slot by slot
        self.budget_tokens, self.compact_threshold = budget_tokens, compact_threshold
        self._alloc_storage(capacity_tokens or 1024)
        self._end = 0
        self._free: list[list[int]] = []  # sorted [start, length] ranges below end
        self._free_tokens = 0
        self._entries: dict[Hashable, _Entry] = {}
        self._handles: dict[int, Hashable] = {}
        self._next_handle = 0
        self._by_path: dict[str, set[Hashable]] = defaultdict(set)
        self._evicted: dict[Hashable, tuple[Any, int]] = {}
        self._evictions = 0
        self._live_tokens = 0
        self._clock = 0
        self._touched: dict[str, int] = {}
        self._touched_dirs: dict[str, int] = {}
        self._heap: list[tuple[tuple, int, Hashable, int]] = []
        self._view: Memory | None = None
        # Per layer, the summaries of slots [0, end) until the next change: shared by every view, so a
        # request's view (its open file masked) reuses their coarse level and compute-dtype copy.
        self._summaries: dict[int, BlockSummary] = {}
        # Chunk contents interned to ints (with how many resident chunks hold each), and the block ids of
        # slots [0, end) built from them until the next change: repeated chunks' blocks share ids.
        self._contents: dict[Hashable, int] = {}
        self._content_refs: dict[int, tuple[Hashable, int]] = {}  # interned -> (content, resident chunks)
        self._next_content = 0
        self._block_ids: BlockIds | None = None
        self.version = 0  # bumped on every change: callers may cache what they build from memory()

    @classmethod
    def for_store(cls, store: Any, device: torch.device | str, **kwargs: Any) -> MemoryBank:
        """A bank shaped for `store`'s model fingerprint, with block summaries for sparse attention."""
        fp = store.fingerprint
        kwargs.setdefault("block_size", DEFAULT_BLOCK_SIZE)
        return cls(fp.mem_layers, fp.kv_heads, fp.head_dim, fp.torch_dtype, device, **kwargs)

    def _span(self, n: int) -> int:
        """Slots a chunk of n tokens takes: whole blocks when summarised."""
        bs = self.block_size
        return n if bs is None else -(-n // bs) * bs

    def _changed(self) -> None:
        self._view = None
        self._summaries.clear()
        self._block_ids = None
        self.version += 1

    def _alloc_storage(self, capacity: int) -> None:
        capacity = self._span(capacity)
        shape = (self.kv_heads, capacity, self.head_dim)  # (Hkv, C, D)
        pin = self.kv_device.type == "cpu" and self.device.type == "cuda"  # host tier: fast partial copies
        self._keys = {i: torch.zeros(shape, dtype=self.dtype, device=self.kv_device, pin_memory=pin)
                      for i in self.layers}
        self._values = {i: torch.zeros(shape, dtype=self.dtype, device=self.kv_device, pin_memory=pin)
                        for i in self.layers}
        if self.block_size is not None:
            blocks = (self.kv_heads, capacity // self.block_size, self.head_dim)  # (Hkv, C / bs, D)
            self._kmin = {i: torch.zeros(blocks, dtype=self.dtype, device=self.device) for i in self.layers}
            self._kmax = {i: torch.zeros(blocks, dtype=self.dtype, device=self.device) for i in self.layers}
        self._mask = torch.full((capacity,), MASK_MIN, dtype=torch.float32, device=self.device)
        self._owner = torch.full((capacity,), -1, dtype=torch.int64)
        self.capacity = capacity

    # -- adding and removing --------------------------------------------------------------------

    def add(self, chunk_id: Hashable, memory: Memory, meta: Any, content: Hashable | None = None) -> bool:
        """Make a chunk's memory resident (replacing `chunk_id` if present); False if the budget dropped it.

        `meta` is what `slot_owner` returns (e.g. a ChunkRow); it needs `.path`, `.ordinal` is optional.
        `content` names what the chunk's memory is (its memory key): chunks of equal content must have equal
        memory (the store keeps one per key); sparse attention then reads one copy (BlockIds).
        """
        self._validate(memory)
        self.remove(chunk_id)
        n = memory.num_tokens
        self._by_path[meta.path].add(chunk_id)
        if self.budget_tokens is not None and self._live_tokens + n > self.budget_tokens:
            if not self._make_room(n, self.priority(meta)):
                self._evicted[chunk_id] = (meta, n)
                self._evictions += 1
                return False
        span = self._span(n)
        start = self._allocate(span)
        for i in self.layers:
            self._keys[i][:, start:start + n].copy_(memory[i].keys[0])  # (Hkv, n, D)
            self._values[i][:, start:start + n].copy_(memory[i].values[0])
            if self.block_size is not None:  # summaries of this chunk's own keys, once
                summary = BlockSummary.of(memory[i].keys, self.block_size, self.device)  # (1, Hkv, nb, D)
                b0 = start // self.block_size
                self._kmin[i][:, b0:b0 + summary.num_blocks].copy_(summary.kmin[0])
                self._kmax[i][:, b0:b0 + summary.num_blocks].copy_(summary.kmax[0])
        if self.layers:
            self._mask[start:start + n].copy_(memory[self.layers[0]].mask.reshape(n))
            self._mask[start + n:start + span] = MASK_MIN  # padding to the block boundary
        handle = self._next_handle
        self._next_handle += 1
        self._owner[start:start + n] = handle
        self._handles[handle] = chunk_id
        self._entries[chunk_id] = _Entry(start, n, meta, handle, span, self._intern(content))
        self._live_tokens += n
        heapq.heappush(self._heap, (self.priority(meta), handle, chunk_id, handle))
        self._changed()
        return True

    def remove(self, chunk_id: Hashable, *, compact: bool = True) -> bool:
        """Forget a chunk (resident or evicted); its slots go to the free list."""
        if chunk_id in self._evicted:
            meta, _ = self._evicted.pop(chunk_id)
            self._discard_path(meta.path, chunk_id)
            return True
        entry = self._entries.pop(chunk_id, None)
        if entry is None:
            return False
        self._discard_path(entry.meta.path, chunk_id)
        self._release(entry)
        if compact:
            self._maybe_compact()
        return True

    def remove_file(self, path: str) -> int:
        """Forget every chunk of `path`; returns how many."""
        ids = list(self._by_path.get(path, ()))
        for chunk_id in ids:
            self.remove(chunk_id, compact=False)
        self._maybe_compact()
        return len(ids)

    def _discard_path(self, path: str, chunk_id: Hashable) -> None:
        ids = self._by_path[path]
        ids.discard(chunk_id)
        if not ids:
            del self._by_path[path]

    def _intern(self, content: Hashable | None) -> int:
        if content is None:
            return -1
        k = self._contents.get(content)
        if k is None:
            k = self._contents[content] = self._next_content
            self._next_content += 1
        self._content_refs[k] = (content, self._content_refs.get(k, (content, 0))[1] + 1)
        return k

    def _release_content(self, k: int) -> None:
        if k < 0:
            return
        content, refs = self._content_refs.pop(k)
        if refs > 1:
            self._content_refs[k] = (content, refs - 1)
        else:  # no resident chunk holds it: forgotten, so a long watch stays bounded
            del self._contents[content]

    def _release(self, entry: _Entry) -> None:
        s, n = entry.start, entry.n
        self._release_content(entry.content)
        self._mask[s:s + n] = MASK_MIN
        self._owner[s:s + n] = -1
        del self._handles[entry.handle]
        self._live_tokens -= n
        self._free_range(s, entry.span)
        self._changed()
        if len(self._heap) > 2 * len(self._entries) + 64:  # drop stale heap entries
            self._heap = [(self.priority(e.meta), e.handle, c, e.handle) for c, e in self._entries.items()]
            heapq.heapify(self._heap)

    def _validate(self, memory: Memory) -> None:
        if list(memory) != self.layers:
            raise ValueError(f"memory layers {list(memory)} != bank layers {self.layers}")
        for i, c in memory.items():
            expected = (1, self.kv_heads, c.num_tokens, self.head_dim)
            if tuple(c.keys.shape) != expected or c.keys.dtype != self.dtype:
                raise ValueError(f"layer {i}: memory {tuple(c.keys.shape)} {c.keys.dtype}, "
                                 f"bank expects {expected} {self.dtype}")

    # -- slots ----------------------------------------------------------------------------------

    def _allocate(self, n: int) -> int:
        for k, (start, length) in enumerate(self._free):  # first fit
            if length >= n:
                if length == n:
                    del self._free[k]
                else:
                    self._free[k] = [start + n, length - n]
                self._free_tokens -= n
                return start
        start = self._end
        if start + n > self.capacity:
            self._grow(start + n)
        self._end += n
        return start

    def _free_range(self, s: int, n: int) -> None:
        k = bisect.bisect_left(self._free, [s, 0])
        if k < len(self._free) and self._free[k][0] == s + n:  # merge with the next free range
            nxt = self._free.pop(k)
            n += nxt[1]
            self._free_tokens -= nxt[1]
        if k > 0 and sum(self._free[k - 1]) == s:  # merge with the previous free range
            k -= 1
            prev = self._free.pop(k)
            s, n = prev[0], prev[1] + n
            self._free_tokens -= prev[1]
        if s + n == self._end:  # the range ends the span: shrink the span instead
            self._end = s
        else:
            self._free.insert(k, [s, n])
            self._free_tokens += n

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` more slots after `end` at once (bulk loads skip repeated doubling)."""
        if self._end + tokens > self.capacity:
            self._grow(self._end + tokens, exact=True)

    def _grow(self, needed: int, exact: bool = False) -> None:
        old = (self._keys, self._values, self._mask, self._owner, self._end)
        keys, values, mask, owner, end = old
        summaries = (self._kmin, self._kmax) if self.block_size is not None else None
        self._alloc_storage(needed if exact else max(needed, 2 * self.capacity))
        for i in self.layers:
            self._keys[i][:, :end].copy_(keys[i][:, :end])
            self._values[i][:, :end].copy_(values[i][:, :end])
            if summaries is not None:
                nb = end // self.block_size
                self._kmin[i][:, :nb].copy_(summaries[0][i][:, :nb])
                self._kmax[i][:, :nb].copy_(summaries[1][i][:, :nb])
        self._mask[:end].copy_(mask[:end])
        self._owner[:end].copy_(owner[:end])
        self._view = None  # views of the old storage would keep it alive
        self._summaries.clear()

    def _maybe_compact(self) -> None:
        if self._end and self._free_tokens / self._end > self.compact_threshold:
            self.compact()

    def compact(self, block: int = 4096) -> None:
        """Move live slots together so slots [0, end) hold no holes."""
        w = 0
        for entry in sorted(self._entries.values(), key=lambda e: e.start):
            s, n = entry.start, entry.span  # padding moves too: its mask hides it at the new place
            if s != w:
                self._move_summaries(s, w, entry.span)
                for off in range(0, n, block):  # blocks bound the temporary for overlapping moves
                    b = min(block, n - off)
                    src, dst = slice(s + off, s + off + b), slice(w + off, w + off + b)
                    overlap = s - w < b
                    for store in (*self._keys.values(), *self._values.values()):
                        store[:, dst] = store[:, src].clone() if overlap else store[:, src]
                    self._mask[dst] = self._mask[src].clone()
                    self._owner[dst] = self._owner[src].clone()
                entry.start = w
            w += entry.span
        self._mask[w:self._end] = MASK_MIN
        self._owner[w:self._end] = -1
        self._end, self._free, self._free_tokens = w, [], 0
        self._changed()

    def _move_summaries(self, src: int, dst: int, span: int) -> None:
        """Block summaries of slots [src, src + span) to [dst, ...); both block-aligned, dst < src."""
        if self.block_size is None:
            return
        bs = self.block_size
        a, b, nb = src // bs, dst // bs, span // bs
        for store in (*self._kmin.values(), *self._kmax.values()):
            store[:, b:b + nb] = store[:, a:a + nb].clone()

    # -- budget ---------------------------------------------------------------------------------

    def touch(self, path: str) -> None:
        """Mark a file as just opened/edited: it and its directory now rank first for the budget."""
        self._clock += 1
        self._touched[path] = self._clock
        self._touched_dirs[posixpath.dirname(path)] = self._clock

    def priority(self, meta: Any) -> tuple:
        """Eviction order key: lower is evicted first (see the module docstring)."""
        path = meta.path
        return (self._touched.get(path, 0), self._touched_dirs.get(posixpath.dirname(path), 0),
                not is_test_path(path), -getattr(meta, "ordinal", 0))

    def _make_room(self, n: int, incoming: tuple) -> bool:
        """Evict chunks ranked below `incoming` until n tokens fit; False (and no change) if impossible."""
        need = self._live_tokens + n - self.budget_tokens
        victims: list[tuple] = []
        while need > 0 and self._heap:
            item = heapq.heappop(self._heap)
            prio, seq, chunk_id, handle = item
            entry = self._entries.get(chunk_id)
            if entry is None or entry.handle != handle:
                continue  # stale
            current = self.priority(entry.meta)
            if current != prio:  # risen since pushed (touch): requeue at its real priority
                heapq.heappush(self._heap, (current, seq, chunk_id, handle))
                continue
            if prio >= incoming:
                heapq.heappush(self._heap, item)
                break
            victims.append(item)
            need -= entry.n
        if need > 0:
            for item in victims:
                heapq.heappush(self._heap, item)
            return False
        for _, _, chunk_id, _ in victims:
            entry = self._entries.pop(chunk_id)
            self._release(entry)
            self._evicted[chunk_id] = (entry.meta, entry.n)
            self._evictions += 1
        return True

    # -- reading --------------------------------------------------------------------------------

    def memory(self, exclude_paths: Iterable[str] = (), exclude_chunks: Iterable[Hashable] = ()) -> Memory:
        """Memory over slots [0, end) (B=1), with excluded chunks masked out.

        Keys and values are views of the bank (no copy); excluding copies only the (end,) mask.
        """
        excluded = {c for p in exclude_paths for c in self._by_path.get(p, ())}
        excluded |= set(exclude_chunks)
        excluded = [self._entries[c] for c in excluded if c in self._entries]
        if not excluded and self._view is not None:
            return self._view
        end = self._end
        mask = self._mask[:end]
        if excluded:
            mask = mask.clone()
            for e in excluded:
                mask[e.start:e.start + e.n] = MASK_MIN
        mask = mask.view(1, 1, end, 1)  # (B, 1, M, 1)
        ids = self._ids(end)
        view = Memory({i: MemCache(self._keys[i][:, :end].unsqueeze(0), self._values[i][:, :end].unsqueeze(0),
                                   mask, self._summary(i, end), ids) for i in self.layers})  # (B, Hkv, M, D)
        if not excluded:
            self._view = view
        return view

    def _summary(self, layer: int, end: int) -> BlockSummary | None:
        """Summaries of slots [0, end) (end is block-aligned), views (1, Hkv, end / bs, D)."""
        if self.block_size is None:
            return None
        if layer not in self._summaries:
            nb = end // self.block_size
            self._summaries[layer] = BlockSummary(self.block_size, self._kmin[layer][None, :, :nb],
                                                  self._kmax[layer][None, :, :nb])
        return self._summaries[layer]

    def _ids(self, end: int) -> BlockIds | None:
        """Block ids of slots [0, end): block j of a chunk with content k is k * 2^20 + j; free: -1."""
        if self.block_size is None:
            return None
        if self._block_ids is None:
            bs = self.block_size
            ids = torch.full((end // bs,), -1, dtype=torch.int64)  # (NB,)
            known = [e for e in self._entries.values() if e.content >= 0]
            if known:
                first = torch.tensor([e.start // bs for e in known])
                count = torch.tensor([e.span // bs for e in known])
                content = torch.tensor([e.content for e in known], dtype=torch.int64)
                at = torch.repeat_interleave(first, count)
                ordinal = torch.arange(int(count.sum())) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
                ids[at + ordinal] = torch.repeat_interleave(content, count) * (1 << 20) + ordinal
            self._block_ids = BlockIds(bs, ids)
        return self._block_ids

    def slot_owner(self, slot: int) -> Any | None:
        """The meta of the chunk holding memory slot `slot` (as indexed in `memory()`), None if free."""
        handle = int(self._owner[slot]) if 0 <= slot < self._end else -1
        return self._entries[self._handles[handle]].meta if handle >= 0 else None

    def chunk_slots(self, chunk_id: Hashable) -> range | None:
        """Slots of a resident chunk, None if it is not resident."""
        e = self._entries.get(chunk_id)
        return range(e.start, e.start + e.n) if e else None

    def content_of(self, chunk_id: Hashable) -> Hashable | None:
        """What a resident chunk's memory is (the `content` it was added with), None if not resident."""
        e = self._entries.get(chunk_id)
        return self._content_refs[e.content][0] if e is not None and e.content >= 0 else None

    def __contains__(self, chunk_id: Hashable) -> bool:
        return chunk_id in self._entries

    def chunks_of(self, path: str) -> dict[Hashable, Any]:
        """Resident chunks of `path`: chunk_id -> meta."""
        return {c: self._entries[c].meta for c in self._by_path.get(path, ()) if c in self._entries}

    def __len__(self) -> int:
        return len(self._entries)

    def resident(self) -> dict[Hashable, Any]:
        """Resident chunks: chunk_id -> meta."""
        return {c: e.meta for c, e in self._entries.items()}

    def evicted(self) -> dict[Hashable, Any]:
        """Chunks kept out by the budget: chunk_id -> meta."""
        return {c: meta for c, (meta, _) in self._evicted.items()}

    def status(self) -> BankStatus:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        kv_slot = 2 * len(self.layers) * self.kv_heads * self.head_dim * itemsize
        summary_slot = kv_slot / self.block_size if self.block_size else 0  # min + max per block
        on_device = self.kv_device == self.device
        per_slot = (kv_slot if on_device else 0) + summary_slot + 4  # + mask (owner is host-side)
        return BankStatus(
            layers=self.layers, live_chunks=len(self._entries), live_tokens=self._live_tokens,
            span_tokens=self._end, capacity_tokens=self.capacity,
            fragmentation=self._free_tokens / self._end if self._end else 0.0,
            budget_tokens=self.budget_tokens, evicted_chunks=len(self._evicted),
            evicted_tokens=sum(n for _, n in self._evicted.values()), evictions=self._evictions,
            device_bytes=int(per_slot * self.capacity),
            host_bytes=(0 if on_device else kv_slot * self.capacity) + 8 * self.capacity)

    # -- bulk load ------------------------------------------------------------------------------

    def load_from_store(self, store: Any, paths: Iterable[str] | None = None, batch: int = 8,
                        stand_ins: Mapping[str, str] | None = None) -> int:
        """Load stored chunks (of `paths`, or all) that have memories; returns how many became resident.

        stand_ins: content hash -> memory key, for chunks whose own memory is not stored yet: such a chunk
        gets that memory (its same text encoded after the text that was before it until an edit above it)
        instead of none, until a later load brings its own. Under a budget, chunks that could not stay
        are recorded as evicted without reading their blobs.
        """
        paths = None if paths is None else list(paths)
        missing = {c.id for c in store.chunks_missing_memory(paths)}
        rows: list[ChunkRow] = ([r for p in paths for r in store.chunks(p)] if paths is not None
                                else store.chunks())
        key_of = {r.id: (stand_ins or {}).get(r.content_hash) if r.id in missing else r.memory_key
                  for r in rows if r.id not in self._entries}
        rows = [r for r in rows if key_of.get(r.id) is not None]
        if self.budget_tokens is not None:
            rows = self._plan(rows)
        by_key: dict[str, list[ChunkRow]] = defaultdict(list)
        for r in rows:
            by_key[key_of[r.id]].append(r)
        self.reserve(sum(self._span(r.token_count) for r in rows) - self._free_tokens)
        added = 0
        for memory_key, memory in store.iter_memories(list(by_key), batch=batch):
            for r in by_key[memory_key]:
                added += self.add(r.id, memory, r, memory_key)
        return added

    def _plan(self, rows: list[ChunkRow]) -> list[ChunkRow]:
        """The candidates worth reading: those in the highest-priority set that fits the budget."""
        pool = [(self.priority(e.meta), e.n, None) for e in self._entries.values()]
        pool += [(self.priority(r), r.token_count, r) for r in rows]
        pool.sort(key=lambda x: x[0], reverse=True)
        total, keep = 0, []
        for _, n, row in pool:
            if total + n <= self.budget_tokens:
                total += n
                if row is not None:
                    keep.append(row)
            elif row is not None:
                self._evictions += row.id not in self._evicted
                self._evicted[row.id] = (row, row.token_count)
                self._by_path[row.path].add(row.id)
        return keep
