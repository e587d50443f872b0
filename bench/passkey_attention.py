"""Issue 16: where the memory layers look when asked for the pass key (a leading indicator of retrieval).

    python bench/passkey_attention.py --model A --model B [--tokens 1024] [--trials 4]

For each model: passkey prompts (finetune/passkey.py, same seeds for every model) whose last
`--local` tokens are the local window (ending with the question) and the rest is memory (chunks
encoded on their own, finetune.evaluate.MemoryCache). One forward of the window with
output_memory_attention: the share of the memory layers' attention mass that falls on the key
sentence's tokens, divided by their share of the memory slots ("lift": 1 = no preference; a model
that retrieves puts most of the question's memory attention on the key). Weights are summed over
heads and every query of the window, as the model reports them.
"""

from __future__ import annotations

import argparse
import json
import random

import torch


@torch.no_grad()
def key_lift(model, tokenizer, n_tokens: int, trials: int, local: int, chunk_len: int, seed: int = 0) -> list[float]:
    from finetune.evaluate import MemoryCache
    from finetune.passkey import filler_chars_for, passkey_prompt

    rng = random.Random(f"attention-{n_tokens}-{seed}")
    cache = MemoryCache(model, chunk_len, progress=False)
    out = []
    for _ in range(trials):
        prompt, key = passkey_prompt(filler_chars_for(tokenizer, n_tokens), rng)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        at = prompt.index(f"The pass key is {key}.")
        start = len(tokenizer(prompt[:at], add_special_tokens=False)["input_ids"])
        end = len(tokenizer(prompt[:prompt.index(" is the pass key.", at) + 17], add_special_tokens=False)["input_ids"])
        split = len(ids) - local
        if end > split:
            continue  # the key is local: nothing to measure in memory
        chunks = [tuple(ids[i:min(i + chunk_len, split)]) for i in range(0, split, chunk_len)]
        cache.ensure({c: list(c) for c in chunks})
        memory = cache.memory(chunks)
        window = torch.tensor([ids[split:]], device=model.device)
        res = model(window, memory=memory, use_cache=True, last_context_length=window.shape[1],
                    output_memory_attention=True)
        total = torch.zeros(split)
        for w in res.memory_attention.values():  # {layer: (B, M)}
            total += w[0].float().cpu()
        share = float(total[start:end].sum() / total.sum())
        out.append(share / ((end - start) / split))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="model dir or training delta dir (repeatable)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--local", type=int, default=64)
    p.add_argument("--chunk-len", type=int, default=256)
    args = p.parse_args(argv)
    from finetune.commands import load_eval_model

    for m in args.model or [None]:
        model, tok, d = load_eval_model(m, "cpu", None)
        lifts = key_lift(model, tok, args.tokens, args.trials, args.local, args.chunk_len)
        print(json.dumps({"model": str(d), "tokens": args.tokens, "local": args.local, "lift": [round(x, 2) for x in lifts],
                          "mean_lift": round(sum(lifts) / len(lifts), 2) if lifts else None}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
