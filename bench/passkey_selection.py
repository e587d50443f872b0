"""Issue 16: does the server's block selection hold the pass key? Selection recall beside accuracy.

    OMP_NUM_THREADS=1 python bench/passkey_selection.py --model DELTA --length 65536 --trials 8 \
        --variants dense,2048/128,2048/128/copies --json bench/results/passkey-selection.json

A delta that reads a 64k passkey with dense memory attention (CPU run 5's step 719: 6/8) read none
with the server's selection (2,048 tokens, query tiles of 128). This bench runs the passkey eval's
prompts (finetune.skill_eval.passkey_trials: same seeds, same memory) under each variant
BUDGET/TILE[/copies] (memory tokens attended / queries sharing one selection in the prefill;
`copies`: without the memory's block ids, so the repeated filler's copies are selected one by one,
as before block ids; `dense` reads every memory token) and records, at every memory layer's
selection, whether one of the key sentence's blocks was chosen (for any key/value head, and the
share of heads):
- prefill: the tile holding the window's last query, which produces the answer's first token;
- decode: each later step (one query, its own selection).
Recall 1.0 with wrong answers means the model, not the selection, misses; recall below 1.0 says
how often the server never showed the model its key.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Variant:
    budget: int  # 0 = dense
    tile: int
    block_ids: bool = True  # False: the memory's block ids dropped (every copy a block of its own)

    @classmethod
    def parse(cls, text: str) -> Variant:
        if text == "dense":
            return cls(0, 0)
        parts = text.split("/")
        if len(parts) > 3 or parts[2:] not in ([], ["copies"]):
            raise SystemExit(f"passkey_selection: bad variant {text!r} (BUDGET[/TILE[/copies]] or dense)")
        return cls(int(parts[0]), int(parts[1]) if len(parts) > 1 else 128, len(parts) < 3)

    @property
    def name(self) -> str:
        return "dense" if not self.budget else f"{self.budget}/{self.tile}" + ("" if self.block_ids else "/copies")


@dataclass
class Score:
    variant: str
    trials: int = 0
    correct: int = 0
    digits: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    prefill_any: list[float] = field(default_factory=list)  # per trial: share of memory layers (any head)
    prefill_heads: list[float] = field(default_factory=list)  # per trial: share of (layer, head) pairs
    decode_any: list[float] = field(default_factory=list)
    decode_heads: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        def mean(xs):
            return round(sum(xs) / len(xs), 3) if xs else None
        return {**asdict(self), "accuracy": self.correct / self.trials if self.trials else None,
                **{f"mean_{k}": mean(getattr(self, k)) for k in
                   ("digits", "prefill_any", "prefill_heads", "decode_any", "decode_heads")}}


class SelectionLog:
    """Wraps attention._select_blocks: each call's chosen blocks (B, Hk, S) and query count."""

    def __init__(self, attention):
        self.attention, self.real = attention, attention._select_blocks
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __enter__(self) -> SelectionLog:
        def record(qf, blocks, n_sel):
            chosen = self.real(qf, blocks, n_sel)
            self.calls.append((qf.shape[2], chosen.detach().cpu()))
            return chosen
        self.attention._select_blocks = record
        return self

    def __exit__(self, *exc) -> None:
        self.attention._select_blocks = self.real


def recall(calls: list[tuple[int, torch.Tensor]], key_blocks: set[int]) -> tuple[float, float]:
    """(share of calls choosing a key block for some head, share of (call, head) pairs choosing one)."""
    if not calls:
        return float("nan"), float("nan")
    any_hits, head_hits, heads = 0, 0, 0
    for _, chosen in calls:
        per_head = [bool(key_blocks & set(row.tolist())) for row in chosen[0]]  # chosen[0]: (Hk, S)
        any_hits += any(per_head)
        head_hits += sum(per_head)
        heads += len(per_head)
    return any_hits / len(calls), head_hits / heads


def run_variant(model, tokenizer, variant: Variant, length: int, trials: int, cache) -> Score:
    from finetune.skill_eval import SkillArgs, answer_passkey, key_digits, passkey_trials
    from longllama_lsp.model import Memory, attention

    model.config.select_memory_tokens(variant.budget)  # 0: dense
    attention.SPARSE_QUERY_TILE = variant.tile or 128
    block = model.config.mem_block_size
    n_mem_layers = len(model.config.mem_layers)
    args = SkillArgs(passkey_lengths=(length,), passkey_trials=trials, chunk_len=256)
    local = model.config.last_context_length
    score = Score(variant.name)
    t0 = time.perf_counter()
    for i, trial in enumerate(passkey_trials(model, tokenizer, cache, length, args, local)):
        if trial.key_at >= trial.split:
            continue  # the key is local: nothing to select
        if not variant.block_ids:
            trial = replace(trial, memory=Memory({i: replace(c, block_ids=None) for i, c in trial.memory.items()}))
        with SelectionLog(attention) as log:
            answer = answer_passkey(model, tokenizer, trial)
        score.trials += 1
        score.correct += trial.key in answer
        score.digits.append(key_digits(trial.key, answer))
        score.answers.append(answer.strip())
        if variant.budget:
            per_layer = math.ceil(trial.window.shape[1] / attention.SPARSE_QUERY_TILE)
            prefill = log.calls[: n_mem_layers * per_layer]
            last_tiles = prefill[per_layer - 1::per_layer]
            keys = set(range(trial.key_at // block, (trial.key_end - 1) // block + 1))
            for name, calls in (("prefill", last_tiles), ("decode", log.calls[n_mem_layers * per_layer:])):
                any_, heads = recall(calls, keys)
                getattr(score, f"{name}_any").append(any_)
                getattr(score, f"{name}_heads").append(heads)
        print(f"{variant.name} {length}: trial {i + 1} key {trial.key} -> {answer.strip()!r} "
              f"prefill {score.prefill_any[-1] if score.prefill_any else '-'} "
              f"decode {score.decode_any[-1] if score.decode_any else '-'} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    score.seconds = round(time.perf_counter() - t0, 1)
    return score


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder or delta (as `longllama eval --model`)")
    ap.add_argument("--length", type=int, default=65536, help="prompt tokens (default 65536)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--variants", default="dense,2048/128,2048/1,8192/128",
                    help="comma-separated BUDGET/TILE or dense (default: %(default)s)")
    ap.add_argument("--json", help="write the results here (after every variant)")
    args = ap.parse_args()

    from finetune.commands import load_eval_model
    from finetune.evaluate import MemoryCache

    model, tokenizer, model_dir = load_eval_model(args.model, "cpu", None)
    model.eval()
    cache = MemoryCache(model, 256, progress=False)
    out = {"model": str(model_dir), "length": args.length, "block": model.config.mem_block_size, "variants": []}
    with torch.no_grad():
        for text in args.variants.split(","):
            out["variants"].append(run_variant(model, tokenizer, Variant.parse(text), args.length,
                                               args.trials, cache).summary())
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for v in out["variants"]:
        print(f"{v['variant']:>10}: {v['correct']}/{v['trials']} exact, digits {v['mean_digits']}, "
              f"key block selected: prefill {v['mean_prefill_any']} (heads {v['mean_prefill_heads']}), "
              f"decode {v['mean_decode_any']} (heads {v['mean_decode_heads']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
