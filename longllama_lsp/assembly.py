"""The memory of one request, and the way back from attended memory slots to chunks of code.

A request's memory is one Memory (B=1) concatenated along M from segments:

    slots |  bank of repository 1 (minus this file) | bank 2 ... | block 1 | block 2 | ...
          |<--------- Segment(bank=...) ----------->|           |<- Segment(block=...) ->|

Bank segments map a slot to its chunk with `bank.slot_owner`; buffer blocks are stretches of the
open file (prompt.Block) encoded with `model.encode_memory` and cached by token hash. The
concatenation is a copy, so the indexer may change a bank (under its `lock`) while a request
runs; it is cached while every bank's `version` and the block list stay the same.

Only the engine's worker thread uses an Assembler.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .prompt import Block
from .repository import Bank, MemorySource

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
    block: Block | None = None
    path: str | None = None  # shown path of a buffer block (relative to its repository when inside one)
    file: str | None = None  # the buffer's own path


@dataclass
class Assembled:
    memory: Memory | None
    segments: list[Segment]

    @property
    def tokens(self) -> int:
        return self.memory.num_tokens if self.memory is not None else 0


NOTHING = Assembled(None, [])


class Assembler:
    """Builds request memories from repositories (repository.MemorySource, read through the
    `repositories` provider per request) and blocks."""

    def __init__(self, encode: Callable[[list[int]], Memory], device: torch.device | str,
                 repositories: Callable[[], Sequence[MemorySource]], cache_tokens: int = 1 << 17,
                 dtype: torch.dtype | None = None):
        self.encode, self.device, self.repositories = encode, device, repositories
        # The request copy is made in the compute dtype: attention then skips a cast of all of memory
        # per decode step (bf16 -> fp32 on CPU: 270 -> 197 ms/step at 42k memory tokens, SmolLM2).
        self.dtype = dtype
        self.cache_tokens = cache_tokens
        self._blocks: OrderedDict[str, Memory] = OrderedDict()
        self._block_tokens = 0
        self._last: tuple[tuple, Assembled] | None = None

    def assemble(self, path: str | None, blocks: Sequence[Block], exclude_current: bool = True,
                 roots: Collection[Path] | None = None) -> Assembled:
        """Every bank (minus `path`'s chunks when exclude_current) + `blocks`, with the slot map.
        `roots` (resolved paths): only the banks of those repositories (a TCP session reads its own
        roots, never another editor's); None: every bank."""
        banks = []  # (repo, bank, root, path relative to root)
        for repo in self.repositories():
            root = Path(repo.root).resolve()
            if len(repo.bank) and (roots is None or root in roots):
                banks.append((repo, repo.bank, root, relative(path, root) if exclude_current else None))
        key = tuple((id(b), b.version, rel) for _, b, _, rel in banks) + tuple(b.key for b in blocks)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        shown = self.display_path(path)
        block_parts = [(self.block_memory(b), Segment(0, 0, block=b, path=shown, file=path)) for b in blocks]
        with contextlib.ExitStack() as locks:  # views alias the banks: copy them while the indexer waits
            parts = []
            for repo, bank, root, rel in banks:
                locks.enter_context(repo.lock)
                mem = bank.memory(exclude_paths=[rel] if rel else ())
                if mem.num_tokens:
                    parts.append((mem, Segment(0, 0, bank=bank, root=root)))
            parts += block_parts
            if not parts:
                return NOTHING
            memory = concat([m for m, _ in parts], self.device, copy=bool(banks), dtype=self.dtype)
        offset = 0
        for mem, seg in parts:
            seg.start, seg.length, offset = offset, mem.num_tokens, offset + mem.num_tokens
        out = Assembled(memory, [seg for _, seg in parts])
        self._last = (key, out)
        return out

    def display_path(self, path: str | None) -> str | None:
        """`path` relative to the first repository root that holds it (as bank sources are named)."""
        for repo in self.repositories():
            rel = relative(path, Path(repo.root).resolve())
            if rel and path and Path(path).is_absolute():
                return rel
        return path

    def block_memory(self, block: Block) -> Memory:
        mem = self._blocks.get(block.key)
        if mem is not None:
            self._blocks.move_to_end(block.key)
            return mem
        mem = self.encode(list(block.ids))
        self._blocks[block.key] = mem
        self._block_tokens += len(block.ids)
        while self._block_tokens > self.cache_tokens and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._block_tokens -= old.num_tokens
        return mem

    def sources(self, attention: torch.Tensor | None, norm: float, asm: Assembled, top: int = 5) -> list[Source]:
        """Top chunks by attention share; attention: (M,) mass per slot, norm: queries * heads * layers."""
        if attention is None or not norm or not asm.segments:
            return []
        import torch

        share = attention / norm  # (M,)
        found: dict[Any, Source] = {}
        starts = [s.start for s in asm.segments]
        for slot in torch.topk(share, min(64, share.shape[0])).indices.tolist():
            seg = asm.segments[bisect.bisect_right(starts, slot) - 1]
            src_key, src = _source_of(seg, slot, share)
            if src is not None and src_key not in found:
                found[src_key] = src
        ranked = sorted(found.values(), key=lambda s: s.weight, reverse=True)
        return [s for s in ranked if s.weight > 0][:top]


def _source_of(seg: Segment, slot: int, share: torch.Tensor) -> tuple[Any, Source | None]:
    """The chunk holding `slot` and its share: a whole buffer block, or a bank chunk (all its slots)."""
    if seg.block is not None:
        w = float(share[seg.start:seg.start + seg.length].sum())
        return ("buf", seg.start), Source(seg.path or "<buffer>", seg.block.start_line, seg.block.end_line,
                                          None, w, seg.file)
    meta = seg.bank.slot_owner(slot - seg.start)
    if meta is None:
        return None, None
    chunk_id = getattr(meta, "id", None)
    slots = seg.bank.chunk_slots(chunk_id) if chunk_id is not None else None
    w = float(share[seg.start + slots.start:seg.start + slots.stop].sum()) if slots else float(share[slot])
    file = str(seg.root / meta.path) if seg.root is not None else None
    return (id(seg.bank), chunk_id, meta.path, meta.start_line), Source(
        meta.path, meta.start_line, meta.end_line, getattr(meta, "symbol", None), w, file)


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
    """Memories (B=1) along M on `device` in `dtype` (default: as stored), masks as float32.

    copy=False lets a single part through as it is (an encoded block, which nothing else changes).
    """
    import torch

    from .model.memory import MemCache, Memory

    parts = [p for p in parts if len(p)]
    if len(parts) == 1 and not copy and (dtype is None or parts[0][next(iter(parts[0]))].keys.dtype == dtype):
        return parts[0]
    out = {}
    for i in list(parts[0]):
        caches = [p[i] for p in parts]
        out[i] = MemCache(torch.cat([c.keys.to(device, dtype) for c in caches], dim=2),
                          torch.cat([c.values.to(device, dtype) for c in caches], dim=2),
                          torch.cat([c.mask.to(device, torch.float32) for c in caches], dim=2))
    return Memory(out)
