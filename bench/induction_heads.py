"""Issue 16: which layers can match a name? Induction-head scores per layer and head.

A memory layer's query finds a definition in memory the way an induction head finds an earlier
occurrence in the local window: it matches "the token before this key is the name I am at" (the
previous-token half comes from the chunk's own earlier layers, which memory encoding runs). Heads
that do this on local context are where memory can retrieve without being taught to; the default
model's first memory layers (7, 14, 21: every 30 // 4-th layer) were placed by count, not by this.

The test is the standard one: a random token sequence, repeated once, without memory. For a query
in the second copy, the score is its attention on the token after the same token's first
occurrence, averaged over queries and sequences (1.0 = always there; a uniform head scores ~1/T).
The copy log-probability (the second copy's tokens, mean) says whether the model copies at all.

    OMP_NUM_THREADS=1 python bench/induction_heads.py --model ~/.cache/longllama/models/smollm2-*-untrained \
        --json bench/results/induction-heads-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.facts import cpu_model  # noqa: E402
from longllama_lsp.model.attention import apply_rope  # noqa: E402


def capture_qk(model) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], list]:
    """Hooks that keep each layer's q_proj and k_proj outputs (B, T, heads * head_dim)."""
    queries: dict[int, torch.Tensor] = {}
    keys: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: queries.__setitem__(i, out)))
        handles.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: keys.__setitem__(i, out)))
    return queries, keys, handles


def attention_probs(q: torch.Tensor, k: torch.Tensor, model) -> torch.Tensor:
    """Causal softmax attention of one layer, (B, heads, T, T), from its projections (B, T, *),
    rotated by the model's own RoPE (its scaling included) at positions 0..T-1."""
    b, t, _ = q.shape
    d = model.config.head_dim
    cos, sin = model.model.rope(torch.arange(t).expand(b, t), torch.float32)  # (B, T, D)
    q = apply_rope(q.view(b, t, -1, d).transpose(1, 2), cos, sin)  # (B, H, T, D)
    k = apply_rope(k.view(b, t, -1, d).transpose(1, 2), cos, sin)  # (B, KV, T, D)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query heads share keys
    scores = q @ k.transpose(-1, -2) / d ** 0.5
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1)


def induction_scores(model, length: int, sequences: int, seed: int) -> tuple[torch.Tensor, float]:
    """(layers, heads) scores and the second copy's mean log-probability."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tokens = torch.randint(vocab // 50, vocab // 2, (sequences, length), generator=g)  # (S, N): ordinary tokens
    bos = torch.full((sequences, 1), model.config.bos_token_id or 0)
    ids = torch.cat([bos, tokens, tokens], 1)  # (S, 1 + 2N)
    queries, keys, handles = capture_qk(model)
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    q_pos = torch.arange(2 + length, 1 + 2 * length)  # second copy, after its first token
    target = q_pos - length + 1  # the token after the same token's first occurrence
    rows = []
    for i in range(len(model.model.layers)):
        probs = attention_probs(queries[i], keys[i], model)
        rows.append(probs[:, :, q_pos, target].mean(dim=(0, 2)))  # (heads,)
    logp = torch.log_softmax(logits[:, 1 + length:-1].float(), -1).gather(-1, ids[:, 2 + length:, None])
    return torch.stack(rows), float(logp.mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint folder (its adapter, if any, is applied)")
    p.add_argument("--length", type=int, default=60, help="tokens per random sequence (repeated once)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)

    from longllama_lsp.model.loading import load_model

    model = load_model(args.model).eval()
    scores, copy_logp = induction_scores(model, args.length, args.sequences, args.seed)
    best = scores.max(dim=1).values
    for i, row in enumerate(scores):
        mark = " memory layer" if i in model.config.mem_layers else ""
        print(f"layer {i:2d}  max {best[i]:.2f}  heads " + " ".join(f"{x:.2f}" for x in row) + mark)
    print(f"second copy mean log-probability {copy_logp:.2f}; memory layers {model.config.mem_layers}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(args.model), "mem_layers": list(model.config.mem_layers), "length": args.length,
            "sequences": args.sequences, "seed": args.seed, "copy_logprob": copy_logp, "cpu": cpu_model(),
            "scores": [[round(float(x), 4) for x in row] for row in scores],
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
