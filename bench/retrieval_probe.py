"""Issue 16: does a model read its training tasks' answers out of memory? Held-out examples of the
retrieval recipe's kinds, scored four ways with the same weights:

    memory    the example's own chunks (the definition or key among its decoys), as in training
    alone     only the chunk that holds the answer (can the model copy from memory at all?)
    decoys    the same chunks without the one that holds the answer (what is left to guess from)
    none      no memory at all

Top-1 and NLL over the answer tokens (the flagged ones), per kind (synthetic: const, signature, dict,
class; passkey). "memory" above "decoys" is what memory contributes, "alone" above "memory" what the
decoys cost; the training log's online top-1 cannot tell retrieval from guessing. Examples come from the recipe's generator with a seed training
never uses (`--seed`; training seeds each step's examples with (seed, step)).

    OMP_NUM_THREADS=1 python bench/retrieval_probe.py --model runs/r5lora --examples 48 \
        --json bench/results/retrieval-probe-step400.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.facts import cpu_model  # noqa: E402

CONDITIONS = ("memory", "alone", "decoys", "none")
KINDS = ("const", "signature", "dict", "class", "passkey")


def answer_slot(example, tokenizer) -> int:
    """Index of the memory chunk that holds the example's answer (the definition or the key)."""
    needle = example.meta.get("definition") or f"pass key is {example.meta['key']}"
    texts = [tokenizer.decode(c) for c in example.memory]
    hits = [i for i, t in enumerate(texts) if needle.strip().splitlines()[0] in t]
    return hits[0] if hits else -1


def variant(example, condition: str, tokenizer):
    """The example with the memory of `condition` (chunks removed stay as empty, fully masked, slots)."""
    if condition == "memory":
        return example
    slot = answer_slot(example, tokenizer)
    keep = [c if (condition == "decoys") == (i != slot) and condition != "none" else []
            for i, c in enumerate(example.memory)]
    return dataclasses.replace(example, memory=keep)


def score(model, examples, chunk_len: int, pad_id: int, batch: int) -> dict[str, float]:
    from finetune.retrieval_train import batch_loss

    hits = nll = n = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            _, stats = batch_loss(model, examples[i:i + batch], None, None, chunk_len, pad_id)
            for kind in ("synthetic", "passkey"):
                if f"{kind}_n" in stats:
                    k = stats[f"{kind}_n"]
                    hits, nll, n = hits + stats[f"{kind}_acc"] * k, nll + stats[f"{kind}_nll"] * k, n + k
    return {"top1": hits / max(n, 1), "nll": nll / max(n, 1), "tokens": int(n)}


def make_examples(maker, rng: random.Random, kinds: list[str], n: int, tokenizer) -> dict[str, list]:
    """{kind: n examples}; the same first n of a kind whichever kinds are asked (one seeded stream)."""
    groups: dict[str, list] = {k: [] for k in kinds}
    while min(len(g) for g in groups.values()) < n:
        ex = maker.synthetic(rng) if rng.random() < 0.8 else maker.passkey(rng)
        kind = ex.meta.get("kind", "passkey")
        if kind in groups and len(groups[kind]) < n and answer_slot(ex, tokenizer) >= 0:
            groups[kind].append(ex)
    return groups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint or training delta (default: the bundled model)")
    p.add_argument("--examples", type=int, default=48, help="examples per kind")
    p.add_argument("--chunk-len", type=int, default=128)
    p.add_argument("--target-len", type=int, default=128)
    p.add_argument("--own-chunks", type=int, default=3, help="chunks per example: the answer's and decoys")
    p.add_argument("--seed", type=int, default=16_000_001, help="an example seed training never uses")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds to probe")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated conditions to score")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    kinds, conditions = args.kinds.split(","), args.conditions.split(",")
    if bad := sorted(set(conditions) - set(CONDITIONS)) + sorted(set(kinds) - set(KINDS)):
        p.error(f"unknown {bad}; conditions: {', '.join(CONDITIONS)}; kinds: {', '.join(KINDS)}")

    from finetune.commands import load_eval_model
    from finetune.retrieval_data import MixArgs, build_maker

    model, tokenizer, model_dir = load_eval_model(args.model, "cpu", "float32")
    mix = MixArgs(mix={"synthetic": 1.0, "passkey": 1.0}, chunk_len=args.chunk_len, target_len=args.target_len,
                  own_chunks=args.own_chunks)
    maker = build_maker(mix, tokenizer)
    groups = make_examples(maker, random.Random(args.seed), kinds, args.examples, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0, results = time.perf_counter(), {}
    for kind, examples in sorted(groups.items()):
        results[kind] = {c: score(model, [variant(e, c, tokenizer) for e in examples], args.chunk_len, pad, args.batch)
                         for c in conditions}
        row = "  ".join(f"{c} {r['top1']:.2f} ({r['nll']:.2f})" for c, r in results[kind].items())
        print(f"{kind:10s} {row}", flush=True)
    out = {"model": str(model_dir), "examples_per_kind": args.examples, "seed": args.seed,
           "shapes": {"chunk_len": args.chunk_len, "target_len": args.target_len, "own_chunks": args.own_chunks},
           "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
           "seconds": round(time.perf_counter() - t0, 1), "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
