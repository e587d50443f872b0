"""FoT cross-batch attention for training memory layers (spec §3.2; reference: FoT/cross_batch.py).

The batch is laid out by the k-packing data pipeline (finetune/data.py): rows j·k … j·k+k−1 are k
consecutive chunks of one document stream ("pack"). In a memory layer, row b attends with ONE softmax
to its own keys (causally, RoPE positions 0..T−1) and, fully visible, to the keys of the previous
`visible[b] − 1` rows b−1, b−2, … rotated as if at position 0 (= unrotated, like stored memory).
Earlier rows of the same pack are positives, rows of the previous pack are negatives. Nothing is
detached: gradients reach the keys and values of every visible row.

Visible contexts per row, B=8, range R=6, pack k=4, stepping (FoT/README "Cross-batch stepping"):

    row        0  1  2  3 | 4  5  6  7
    visible    1  2  3  4 | 1  4  7  7      (A = R+1 = 7, step = ceil(7/3) = 3)
    extra      0  1  2  3 | 0  3  6  6      (pack row j sees min(3j+1, 7) − 1, capped at b)

LongLLaMA-3B (`doc_aware_k4`, R=3, stepping): visible 1, 3, 4, 4 per pack = (positives, negatives)
(0,0) (1,1) (2,1) (3,0), an 8k differentiable context from 2k rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CrossBatch:
    """Cross-batch setting of one training step: `range` extra contexts (R, the paper's d: its d contexts are 1 positive + d−1 negatives),
    `pack` rows per document stream (k of `doc_aware_k{k}`), `stepping` = a range per pack row."""

    range: int
    pack: int = 1
    stepping: bool = True

    def __post_init__(self):
        if self.range < 0:
            raise ValueError(f"cross-batch range must be >= 0, got {self.range}")
        if self.pack < 1:
            raise ValueError(f"cross-batch pack must be >= 1, got {self.pack}")

    def visible(self, batch: int) -> torch.Tensor:
        """(B,) number of contexts each row attends to; see `visible_contexts`."""
        return visible_contexts(batch, self.range, self.pack, self.stepping)


def visible_contexts(batch: int, cross_batch_range: int, pack: int, stepping: bool) -> torch.Tensor:
    """(B,) LongTensor: contexts (own row + previous rows) row b attends to, the reference's `pack_size`.

    A = R+1. With stepping and pack > 1, pack row j = b mod pack sees min(j·step + 1, A) with
    step = ceil(A / max(pack−1, 1)); otherwise every row sees A. Always capped at b+1: rows never wrap
    around to later rows of the batch (that would leak the future of a document).
    """
    if batch % pack != 0:
        raise ValueError(f"batch size {batch} is not divisible by pack {pack}")
    if cross_batch_range < 0:
        raise ValueError(f"cross-batch range must be >= 0, got {cross_batch_range}")
    a = cross_batch_range + 1
    b = torch.arange(batch)
    if stepping and pack > 1:
        step = math.ceil(a / max(pack - 1, 1))
        size = torch.clamp((b % pack) * step + 1, max=a)
    else:
        size = torch.full((batch,), a)
    return torch.minimum(size, b + 1)


def crossbatch_attention(
    q: torch.Tensor,
    k_local: torch.Tensor,
    k_mem: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float | None = None,
    local_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Memory-layer attention over the own row (causal) plus previous rows (fully visible).

    q: (B, H, T, D) RoPE-rotated at positions 0..T−1 (or unrotated without mem_positionals).
    k_local: (B, Hkv, T, D) rotated like q. k_mem: (B, Hkv, T, D) the same keys unrotated, used when
    later rows read this row. v: (B, Hkv, T, D). visible: (B,) from `visible_contexts`, 1 <= visible[b]
    <= b+1. local_mask: optional additive (B, 1, T, T) for the own row (e.g. padding), replacing the
    causal mask; the reference masks nothing in other rows. Returns (B, H, T, D).

    Keys of row b, context c (0 = own row) = row b−c, concatenated to (B, Hkv, A·T, D); one softmax
    over all of them, invisible contexts masked. Runs on SDPA (GQA without repeating heads), so no
    (B, H, T, A·T) score tensor is kept for backward when a fused kernel is available.
    """
    bsz, heads, t, d = q.shape
    kv_heads = k_local.shape[1]
    for name, x in (("k_local", k_local), ("k_mem", k_mem), ("v", v)):
        if x.shape != (bsz, kv_heads, t, d):
            raise ValueError(f"crossbatch {name} shape {tuple(x.shape)}, expected {(bsz, kv_heads, t, d)}")
    if heads % kv_heads != 0:
        raise ValueError(f"query heads {heads} are not a multiple of kv heads {kv_heads}")
    if visible.shape != (bsz,):
        raise ValueError(f"crossbatch visible shape {tuple(visible.shape)}, expected {(bsz,)}")
    rows = torch.arange(bsz, device=visible.device)
    if bool((visible < 1).any()) or bool((visible > rows + 1).any()):
        raise ValueError(f"visible contexts must satisfy 1 <= visible[b] <= b+1, got {visible.tolist()}")
    if local_mask is not None and local_mask.shape != (bsz, 1, t, t):
        raise ValueError(f"crossbatch local_mask shape {tuple(local_mask.shape)}, expected {(bsz, 1, t, t)}")

    a = int(visible.max())
    src = (rows[:, None] - torch.arange(a, device=visible.device)) % bsz  # (B, A) row read by context c
    src = src.to(q.device)
    keys = torch.cat([k_local[:, None], k_mem[src[:, 1:]]], dim=1)  # (B, A, Hkv, T, D)
    values = v[src]  # (B, A, Hkv, T, D)
    keys = keys.transpose(1, 2).reshape(bsz, kv_heads, a * t, d)  # (B, Hkv, A·T, D)
    values = values.transpose(1, 2).reshape(bsz, kv_heads, a * t, d)

    seen = torch.arange(a, device=q.device) < visible.to(q.device)[:, None]  # (B, A)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    allowed = seen[:, None, :, None].expand(bsz, t, a, t).clone()  # (B, T, A, T)
    allowed[:, :, 0] = causal if local_mask is None else True
    allowed = allowed.reshape(bsz, 1, t, a * t)
    if local_mask is None:
        mask = allowed
    else:
        mask = torch.zeros(bsz, 1, t, a, t, dtype=q.dtype, device=q.device)
        mask[:, :, :, 0] = local_mask.to(q.dtype)
        mask = mask.reshape(bsz, 1, t, a * t).masked_fill(~allowed, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads
    )
