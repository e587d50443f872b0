"""int8 memory keys/values with one scale per (head, token) row: half the bytes of bfloat16.

    q, scale = quantize_rows(x)          # x (..., D) float -> q (..., D) int8, scale (..., 1) float16
    y = dequantize_rows(q, scale, dtype) # back to `dtype`; |y - x| <= scale / 2 per element

A row is one token's key (or value) in one KV head, D = head_dim values (64 for SmolLM2): the
natural block, since keys differ in scale from token to token and head to head. Stored bytes per
row: D + 2 (the float16 scale) against 2 D for bfloat16, i.e. 66 / 128 = 52% at D = 64.
Whether it is worth it is a perplexity question: `bench/bench_int8_memory.py` measures it.
"""

from __future__ import annotations

import torch


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per last-dim row: (q int8 (..., D), scale float16 (..., 1))."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).to(torch.float16)
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)  # an all-zero row stays zero
    q = torch.round(xf / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_rows, in `dtype`."""
    return (q.float() * scale.float()).to(dtype)
