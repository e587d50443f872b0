"""indexer.quant: int8 rows with float16 scales round-trip within half a step, in half the bytes.

Test Data: memory keys/values of the seeded tiny LongLLaMA (tests/helpers_models.py) for a stdlib
source file, and hand-made rows for the edge cases (all zero, one large outlier).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers_models import smol_tokenizer_dir, tiny_model_dir  # noqa: F401

from indexer.quant import dequantize_rows, quantize_rows


def test_round_trip_error_is_at_most_half_a_step_per_row(tiny_model_dir):  # noqa: F811
    from longllama_lsp.model.loading import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    text = (Path(json.__file__).parent / "decoder.py").read_text()[:2000]
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:100]])
    with torch.inference_mode():
        memory = model.encode_memory(ids)
    for cache in memory.values():
        for x in (cache.keys, cache.values):  # (1, Hkv, T, D)
            q, scale = quantize_rows(x)
            assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (*x.shape[:-1], 1)
            y = dequantize_rows(q, scale, x.dtype)
            assert y.dtype == x.dtype
            step = scale.float()
            assert ((y.float() - x.float()).abs() <= step / 2 + step * 1e-2 + 1e-6).all()
            d = x.shape[-1]
            assert q.numel() + 2 * scale.numel() == x.numel() * (d + 2) // d  # vs 2 bytes a value in bfloat16


def test_zero_rows_and_outliers():
    x = torch.zeros(2, 64)
    x[1, 0] = 1000.0
    x[1, 1] = 1.0
    q, scale = quantize_rows(x)
    y = dequantize_rows(q, scale, torch.float32)
    assert torch.equal(y[0], torch.zeros(64))  # no division by zero
    assert abs(float(y[1, 0]) - 1000.0) <= float(scale[1]) / 2 + 0.5  # float16 scale: ~0.05% of the max
    assert q[1, 1] == 0  # an outlier's row loses its small values: the price of one scale per row
