"""The memory type: per memory layer, a bag of (key, value) pairs with a padding mask.

Memory keys are stored exactly as the memory layer's `k_proj` produced them, unrotated
("rotated as if at position 0", spec §2.2.6), so a memory is an unordered bag: chunks cached
separately can be concatenated in any order and handed to the model (spec §2.5).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

# Additive mask value for hidden memory slots; the reference clamps scores at max(finfo.min, -1e6).
MASK_MIN = -1e6


@dataclass
class MemCache:
    """One memory layer's memory.

    keys, values: (B, Hkv, M, D) in the config's mem_dtype (raw k_proj / v_proj outputs, GQA heads
    not repeated). mask: (B, 1, M, 1) additive float, 0 for visible slots, MASK_MIN-ish for padding.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        b, h, m, d = self.keys.shape
        if self.values.shape != self.keys.shape:
            raise ValueError(f"memory values {tuple(self.values.shape)} != keys {tuple(self.keys.shape)}")
        if tuple(self.mask.shape) != (b, 1, m, 1):
            raise ValueError(f"memory mask {tuple(self.mask.shape)}, expected {(b, 1, m, 1)}")

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str = "cpu", mask_dtype: torch.dtype = torch.float32) -> MemCache:
        z = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)  # (B, Hkv, 0, D)
        return cls(z, z.clone(), torch.empty(batch, 1, 0, 1, dtype=mask_dtype, device=device))

    @classmethod
    def concat(cls, parts: Iterable[MemCache]) -> MemCache:
        parts = list(parts)
        if not parts:
            raise ValueError("cannot concatenate zero memory caches")
        return cls(torch.cat([p.keys for p in parts], dim=2),
                   torch.cat([p.values for p in parts], dim=2),
                   torch.cat([p.mask for p in parts], dim=2))

    def to(self, device=None, dtype: torch.dtype | None = None) -> MemCache:
        return MemCache(self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype),
                        self.mask.to(device=device))

    def select(self, index: torch.Tensor) -> MemCache:
        """Memory slots `index` (1-D LongTensor over M)."""
        return MemCache(self.keys[:, :, index], self.values[:, :, index], self.mask[:, :, index])


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
