"""Encoding throughput against this machine's fp32 matmul peak, measured in the same process.

    python bench/bench_encode_peak.py [--chunks 40] [--package email] [--json out.json]

1. peak: torch.mm in float32 on square 1024 matrices and on the model's own linear shapes at a
   chunk's typical length (rows = mean chunk tokens), for ~2 s each: GFLOP/s.
2. encode: the default model (SmolLM2-135M as LongLLaMA) encodes real chunks of a stdlib package,
   one chunk per forward as the indexer does on a CPU: tokens/s.
3. achieved GFLOP/s = tokens/s x FLOPs per token of the layers an encode runs (up to the last
   memory layer: 2 x weights of q, k, v, o, gate, up, down per layer, plus attention's 4 x T x d),
   and its share of the peak. The gap is what batching and thread use can still win.

Say the load average with the figures: it is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import longllama_lsp  # noqa: E402, F401, I001  (sets OMP_WAIT_POLICY=PASSIVE before torch loads: 6x on a busy CPU)
import torch  # noqa: E402


def gflops_mm(m: int, k: int, n: int, seconds: float = 2.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        done += 1
    return 2 * m * k * n * done / (time.perf_counter() - t0) / 1e9


def flops_per_token(cfg, tokens: int) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i) + 4 * tokens * h  # linears + attention
    return per_layer * (max(cfg.mem_layers) + 1)


def chunk_texts(package: str, count: int, tokenizer) -> list[str]:
    from indexer.chunker import chunk_file

    src = Path(json.__file__).parent.parent / package
    count_tokens = lambda t: len(tokenizer.encode(t, add_special_tokens=False))  # noqa: E731
    texts = []
    for path in sorted(src.rglob("*.py")):
        texts += [c.text for c in chunk_file(path.name, path.read_bytes(), count_tokens, 256).chunks]
    step = max(1, len(texts) // count)
    return texts[::step][:count]  # spread over the package: short and long chunks alike


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--package", default="email")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from indexer.encoder import Encoder
    from longllama_lsp.load import load_model_and_tokenizer

    out = {"threads": torch.get_num_threads(), "load_start": os.getloadavg()[0]}
    model, tokenizer, _ = load_model_and_tokenizer(device="cpu", decoding=False)
    cfg = model.config
    texts = chunk_texts(args.package, args.chunks, tokenizer)
    mean_t = round(sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts) / len(texts))
    kv = cfg.num_key_value_heads * cfg.head_dim
    out["peak_gflops_square_1024"] = gflops_mm(1024, 1024, 1024)
    out["peak_gflops_model_shapes"] = {
        f"{mean_t}x{k}x{n}": gflops_mm(mean_t, k, n)
        for k, n in ((cfg.hidden_size, cfg.intermediate_size), (cfg.hidden_size, kv),
                     (cfg.intermediate_size, cfg.hidden_size))}
    encoder = Encoder(model, tokenizer)
    encoder.encode(texts[:2])  # warm-up
    encoder.stats.tokens = encoder.stats.chunks = 0
    encoder.stats.seconds = 0.0
    encoder.encode(texts)
    rate = encoder.stats.tokens / encoder.stats.seconds
    achieved = rate * flops_per_token(cfg, mean_t) / 1e9
    out.update(chunks=len(texts), mean_chunk_tokens=mean_t, encode_tokens_per_s=rate,
               encode_gflops=achieved, share_of_square_peak=achieved / out["peak_gflops_square_1024"],
               load_end=os.getloadavg()[0])
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
