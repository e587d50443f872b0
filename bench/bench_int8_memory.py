"""int8 memory (indexer/quant.py: one float16 scale per head-token row) against the bfloat16 the
index stores today: held-out perplexity with repository memory, and bytes per token.

The setup of bench/bench_encoding.py (its "package" scope, memory encoded chunk by chunk as the
indexer does): the last `--window` tokens of a few files of a stdlib package are scored with the
memory of every selected file's text before its window; the memory is used as stored (bfloat16)
and after an int8 round trip. Keep int8 only if perplexity moves by less than 0.5%.

    python bench/bench_int8_memory.py [--quick] [--package email] [--files 5] [--json out.json]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import longllama_lsp  # noqa: E402, F401, I001  (sets OMP_WAIT_POLICY=PASSIVE before torch loads)
from bench_encoding import chunk_ids, encode_independent, nll, parse_args, pick_files  # noqa: E402


def int8_round_trip(memory):
    """Through the index's own blob codec (indexer.schema, encoding 'int8-rows'): what the store gives back."""
    from indexer.schema import Fingerprint, decode_memory, encode_memory

    first = next(iter(memory.values())).keys  # (1, Hkv, T, D)
    fp = Fingerprint("bench", "bench", "bench", str(first.dtype).removeprefix("torch."), tuple(memory),
                     kv_heads=first.shape[1], head_dim=first.shape[3])
    row, mask, data = encode_memory(memory, fp, "int8-rows")
    return decode_memory(row["dtype"], row["shape"], row["layers"], mask, data, row["encoding"])


def main() -> None:
    args = parse_args()
    if args.quick:
        args.files, args.prefix_tokens, args.window = 3, 1024, 384
    import torch

    from indexer.encoder import Encoder
    from longllama_lsp.load import load_model_and_tokenizer
    from longllama_lsp.model.memory import Memory

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, _ = load_model_and_tokenizer(device="cpu", decoding=False)
    enc = Encoder(model, tok)
    load_start = os.getloadavg()[0]
    files = pick_files(args.package, args.files, enc.count_tokens, args.window, args.prefix_tokens)
    windows = [enc.token_ids(held)[: args.window] for _, _, held in files]
    stored = Memory.concat([encode_independent(model, chunk_ids(n, p, enc, args.chunk_tokens)) for n, p, _ in files])
    variants = {"none": None, "bfloat16": stored, "int8": int8_round_trip(stored)}
    ppl = {}
    for name, memory in variants.items():
        s = n = 0
        for w in windows:
            a, b = nll(model, w, memory)
            s, n = s + a, n + b
        ppl[name] = math.exp(s / n)
    cfg = model.config
    rows = 2 * len(cfg.mem_layers) * cfg.num_key_value_heads  # K and V rows per token
    out = {"package": args.package, "files": [f[0] for f in files], "held_out_tokens": n,
           "memory_tokens": stored.num_tokens, "perplexity": ppl,
           "int8_vs_bfloat16_percent": 100 * (ppl["int8"] / ppl["bfloat16"] - 1),
           "bytes_per_token": {"bfloat16": rows * cfg.head_dim * 2, "int8": rows * (cfg.head_dim + 2)},
           "load_start": load_start, "load_end": os.getloadavg()[0], "seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
