"""The memory type: per memory layer, a bag of (key, value) pairs with a padding mask.

Memory keys are stored exactly as the memory layer's `k_proj` produced them, unrotated
("rotated as if at position 0", spec §2.2.6), so a memory is an unordered bag: chunks cached
separately can be concatenated in any order and handed to the model (spec §2.5).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

# Additive mask value for hidden memory slots; the reference clamps scores at max(finfo.min, -1e6).
MASK_MIN = -1e6
# Memory slots per block of sparse memory attention: LongLlamaConfig.mem_block_size's default and the
# block the indexer's bank aligns chunks to (here, not in the config, so the bank needs no transformers).
DEFAULT_BLOCK_SIZE = 32


@dataclass
class BlockSummary:
    """Quest summaries of memory keys in blocks of `size` consecutive slots (the last may be short).

    kmin, kmax: (B, Hkv, NB, D), NB = ceil(M / size), the elementwise min and max of each block's
    keys, masked slots included: sum_d max(q_d kmin_d, q_d kmax_d) bounds q.k for every key of the
    block from above, so the summary does not depend on the mask (excluding a file per request
    changes only the mask and keeps the summary).
    """

    size: int
    kmin: torch.Tensor
    kmax: torch.Tensor
    # The coarse level (groups of blocks) and a copy in the compute dtype, built on first use and kept
    # with these summaries: a bank's summaries serve every request's view (each masks another file).
    _coarse: BlockSummary | None = field(default=None, init=False, repr=False, compare=False)
    _cast: BlockSummary | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_blocks(self) -> int:
        return self.kmin.shape[2]

    def coarse(self, group: int) -> BlockSummary:
        """Summaries of groups of `group` consecutive blocks: the min of their mins and the max of their
        maxes, so a group's bound is >= the bound of each of its blocks (the last group may be short)."""
        if self._coarse is None or self._coarse.size != self.size * group:
            full = self.num_blocks // group * group

            def reduce(x: torch.Tensor, op) -> torch.Tensor:  # (B, Hkv, NB, D) -> (B, Hkv, NG, D), no copy of x
                parts = [op(x[:, :, :full].unflatten(2, (-1, group)), dim=3)]
                if full < self.num_blocks:  # the short last group
                    parts.append(op(x[:, :, full:], dim=2, keepdim=True))
                return torch.cat(parts, dim=2)

            self._coarse = BlockSummary(self.size * group, reduce(self.kmin, torch.amin), reduce(self.kmax, torch.amax))
        return self._coarse

    def cast(self, device, dtype: torch.dtype) -> BlockSummary:
        """These summaries on `device` in `dtype` (self when they are); the copy is kept."""
        device = torch.device(device)
        if self.kmin.dtype == dtype and self.kmin.device == device:
            return self
        if self._cast is None or self._cast.kmin.dtype != dtype or self._cast.kmin.device != device:
            self._cast = BlockSummary(self.size, self.kmin.to(device, dtype), self.kmax.to(device, dtype))
        return self._cast

    @classmethod
    def of(cls, keys: torch.Tensor, size: int, device=None) -> BlockSummary:
        """Summaries of keys (B, Hkv, M, D), computed on `device` (default: the keys' own)."""
        b, h, m, d = keys.shape
        full = m // size * size
        mins, maxs = [], []
        for s0 in range(0, full, 65536 // size * size):  # bounded temporaries for host-tier keys
            part = keys[:, :, s0:min(s0 + 65536 // size * size, full)].to(device)
            part = part.reshape(b, h, -1, size, d)  # (B, Hkv, nb, size, D)
            mins.append(part.amin(dim=3))
            maxs.append(part.amax(dim=3))
        if full < m:  # short last block
            tail = keys[:, :, full:].to(device)
            mins.append(tail.amin(dim=2, keepdim=True))
            maxs.append(tail.amax(dim=2, keepdim=True))
        if not mins:
            empty = keys.new_empty(b, h, 0, d, device=device)
            return cls(size, empty, empty.clone())
        return cls(size, torch.cat(mins, dim=2), torch.cat(maxs, dim=2))



@dataclass(frozen=True)
class BlockIds:
    """The content of each block of `size` memory slots, as whoever built the memory knows it: blocks
    with equal ids >= 0 hold equal keys, values and mask slots (the same chunk content at the same
    block of it, encoded once); -1 = unknown, never taken for another block. ids: (NB,) int64.

    Sparse attention reads one copy of repeated content, weighted by its count (`MemCache.distinct_blocks`):
    otherwise copies of one filler or boilerplate block can fill the whole selection budget.
    """

    size: int
    ids: torch.Tensor

    @classmethod
    def of_chunk(cls, content: int, num_tokens: int, size: int) -> BlockIds:
        """The ids of one chunk's blocks: `content` (>= 0) names the chunk's content; block j is content * 2^20 + j."""
        nb = -(-num_tokens // size)
        return cls(size, content * (1 << 20) + torch.arange(nb, dtype=torch.int64))


@dataclass
class MemCache:
    """One memory layer's memory.

    keys, values: (B, Hkv, M, D) in the config's mem_dtype (raw k_proj / v_proj outputs, GQA heads
    not repeated). mask: (B, 1, M, 1) additive float, 0 for visible slots, MASK_MIN-ish for padding.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    # Block summaries for sparse memory attention, built once (by the bank, or on first use) and kept
    # with the memory; keys/values may stay in host memory (the host tier) while these live on the device.
    summary: BlockSummary | None = field(default=None, repr=False, compare=False)
    # What each block holds, when the builder knows (batch-1 memories only): repeated blocks are read once.
    block_ids: BlockIds | None = field(default=None, repr=False, compare=False)
    _visible: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)
    _distinct: tuple[int, torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False,
                                                                     compare=False)
    _visible_groups: tuple[int, int, torch.Tensor] | None = field(default=None, init=False, repr=False,
                                                                  compare=False)

    def __post_init__(self):
        b, h, m, d = self.keys.shape
        if self.values.shape != self.keys.shape:
            raise ValueError(f"memory values {tuple(self.values.shape)} != keys {tuple(self.keys.shape)}")
        if tuple(self.mask.shape) != (b, 1, m, 1):
            raise ValueError(f"memory mask {tuple(self.mask.shape)}, expected {(b, 1, m, 1)}")
        if self.block_ids is not None and (b != 1 or self.block_ids.ids.shape != (-(-m // self.block_ids.size),)):
            raise ValueError(f"block ids {tuple(self.block_ids.ids.shape)} of size {self.block_ids.size} "
                             f"do not cover a batch-1 memory of {m} slots (batch {b})")

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str = "cpu", mask_dtype: torch.dtype = torch.float32) -> MemCache:
        z = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)  # (B, Hkv, 0, D)
        return cls(z, z.clone(), torch.empty(batch, 1, 0, 1, dtype=mask_dtype, device=device))

    def blocks(self, size: int, device=None) -> BlockSummary:
        """This memory's block summaries for blocks of `size`, computed once and kept on the cache."""
        if self.summary is None or self.summary.size != size:
            self.summary = BlockSummary.of(self.keys, size, device)
        return self.summary

    def visible_blocks(self, size: int, device=None) -> torch.Tensor:
        """(B, NB) bool: blocks of `size` holding at least one visible slot; kept while the mask is."""
        if self._visible is None or self._visible[0] != size:
            b, m = self.mask.shape[0], self.num_tokens
            nb = -(-m // size)
            seen = torch.zeros(b, nb * size, dtype=torch.bool, device=device)
            seen[:, :m] = self.mask[:, 0, :, 0].to(device) > MASK_MIN / 2
            self._visible = (size, seen.view(b, nb, size).any(dim=-1))
        return self._visible[1]

    def distinct_blocks(self, size: int, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keep (1, NB) bool, log_count (NB,) float32): of each set of visible blocks with equal ids, the
        first is kept and carries the log of their count (its keys stand for all of them in one softmax:
        exp(s + log n) = n exp(s)); the others are hidden. None without block ids of `size`. Kept
        while the mask is (a request's view masks its own file: its copies elsewhere stay)."""
        if self.block_ids is None or self.block_ids.size != size:
            return None
        if self._distinct is None or self._distinct[0] != size:
            visible = self.visible_blocks(size, device)[0]  # (NB,)
            ids = self.block_ids.ids.to(visible.device)
            nb = ids.shape[0]
            order = torch.arange(nb, device=visible.device)
            # Unknown ids and hidden blocks get ids of their own (-1 - index): never merged with others.
            key = torch.where(visible & (ids >= 0), ids, -1 - order)
            _, group, count = torch.unique(key, return_inverse=True, return_counts=True)
            first = torch.full((count.shape[0],), nb, device=visible.device).scatter_reduce(
                0, group, order, reduce="amin")
            keep = visible & (first[group] == order)
            log_count = torch.where(keep, count[group].float().log(), torch.zeros((), device=visible.device))
            self._distinct = (size, keep[None], log_count)
        return self._distinct[1], self._distinct[2]

    def visible_groups(self, size: int, group: int, device=None) -> torch.Tensor:
        """(B, NG) bool: groups of `group` blocks of `size` holding a visible block; kept as visible_blocks."""
        if self._visible_groups is None or self._visible_groups[:2] != (size, group):
            self._visible_groups = (size, group, any_in_groups(self.visible_blocks(size, device), group))
        return self._visible_groups[2]

    @classmethod
    def concat(cls, parts: Iterable[MemCache]) -> MemCache:
        parts = list(parts)
        if not parts:
            raise ValueError("cannot concatenate zero memory caches")
        return cls(torch.cat([p.keys for p in parts], dim=2),
                   torch.cat([p.values for p in parts], dim=2),
                   torch.cat([p.mask for p in parts], dim=2), _concat_summaries(parts), _concat_block_ids(parts))

    def to(self, device=None, dtype: torch.dtype | None = None) -> MemCache:
        summary = self.summary
        if summary is not None:
            summary = BlockSummary(summary.size, summary.kmin.to(device=device, dtype=dtype),
                                   summary.kmax.to(device=device, dtype=dtype))
        return MemCache(self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype),
                        self.mask.to(device=device), summary, self.block_ids)

    def on_host(self, directory: str | None = None) -> MemCache:
        """The host tier: keys/values in host memory (pinned when a GPU is present), or memory-mapped
        from files in `directory`; the summary (if built) stays where it is. Sparse attention reads
        only the selected blocks from here."""
        return MemCache(_host_copy(self.keys, directory, "keys"), _host_copy(self.values, directory, "values"),
                        self.mask, self.summary, self.block_ids)

    def select(self, index: torch.Tensor) -> MemCache:
        """Memory slots `index` (1-D LongTensor over M)."""
        return MemCache(self.keys[:, :, index], self.values[:, :, index], self.mask[:, :, index])


def any_in_groups(visible: torch.Tensor, group: int) -> torch.Tensor:
    """(B, NB) visible blocks -> (B, NG) groups of `group` blocks holding one (the last may be short)."""
    pad = -visible.shape[1] % group
    return torch.nn.functional.pad(visible, (0, pad)).view(visible.shape[0], -1, group).any(dim=-1)


def _concat_summaries(parts: list[MemCache]) -> BlockSummary | None:
    """The parts' summaries joined when some part has one and every block stays whole (all parts but
    the last a multiple of its block size): parts without one (a few encoded blocks next to a bank)
    are summarised now, on the summary's device. Otherwise None (built again on first use)."""
    known = next((p.summary for p in parts if p.summary is not None), None)
    if known is None or any(p.num_tokens % known.size for p in parts[:-1]):
        return None
    sums = [p.summary if p.summary is not None and p.summary.size == known.size
            else BlockSummary.of(p.keys, known.size, known.kmin.device) for p in parts]
    return BlockSummary(known.size, torch.cat([s.kmin.to(known.kmin.dtype) for s in sums], dim=2),
                        torch.cat([s.kmax.to(known.kmax.dtype) for s in sums], dim=2))


def _concat_block_ids(parts: list[MemCache]) -> BlockIds | None:
    """The parts' block ids joined when some part has them and every block stays whole (all parts but the
    last a multiple of the block size); parts without ids (a window the model moved to memory while
    decoding) get -1, unknown. Otherwise None."""
    known = next((p.block_ids for p in parts if p.block_ids is not None), None)
    if known is None or any(p.num_tokens % known.size for p in parts[:-1]) \
            or any(p.block_ids is not None and p.block_ids.size != known.size for p in parts):
        return None
    return BlockIds(known.size, torch.cat([
        p.block_ids.ids if p.block_ids is not None else torch.full((-(-p.num_tokens // known.size),), -1)
        for p in parts]))


def _host_copy(x: torch.Tensor, directory: str | None, name: str) -> torch.Tensor:
    """x in host memory: a memory-mapped file under `directory`, pinned memory with CUDA, else plain."""
    if directory is None:
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=torch.cuda.is_available())
        return out.copy_(x)
    import os
    import tempfile

    import numpy as np

    # numpy has no bfloat16: map raw 16/32-bit words and view them as x's dtype.
    raw = {2: np.int16, 4: np.int32}[x.element_size()]
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".mem", dir=directory)
    os.close(fd)
    mm = np.memmap(path, dtype=raw, mode="w+", shape=tuple(x.shape))
    out = torch.from_numpy(mm).view(x.dtype)
    out.copy_(x)
    return out


class Memory(Mapping[int, MemCache]):
    """Memory of every memory layer: {layer index: MemCache}, all with the same number of tokens M."""

    def __init__(self, layers: Mapping[int, MemCache]):
        self._layers = dict(sorted(layers.items()))
        sizes = {c.num_tokens for c in self._layers.values()}
        if len(sizes) > 1:
            raise ValueError(f"memory layers disagree on token count: {sizes}")

    def __getitem__(self, layer: int) -> MemCache:
        return self._layers[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Memory(layers={list(self._layers)}, tokens={self.num_tokens})"

    @property
    def num_tokens(self) -> int:
        return next(iter(self._layers.values())).num_tokens if self._layers else 0

    @classmethod
    def concat(cls, parts: Iterable[Memory]) -> Memory:
        """Concatenate memories along M (order does not matter to the model, up to float error)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls({})
        layers = list(parts[0])
        for p in parts[1:]:
            if list(p) != layers:
                raise ValueError(f"memory layers differ: {layers} vs {list(p)}")
        return cls({i: MemCache.concat(p[i] for p in parts) for i in layers})

    def to(self, device=None, dtype: torch.dtype | None = None) -> Memory:
        return Memory({i: c.to(device, dtype) for i, c in self._layers.items()})

    def select(self, index: torch.Tensor) -> Memory:
        return Memory({i: c.select(index) for i, c in self._layers.items()})

    def split_rows(self) -> list[Memory]:
        """One Memory per batch row (B=1 each)."""
        batch = next(iter(self._layers.values())).keys.shape[0] if self._layers else 0
        return [Memory({i: MemCache(c.keys[b:b + 1], c.values[b:b + 1], c.mask[b:b + 1])
                        for i, c in self._layers.items()}) for b in range(batch)]
