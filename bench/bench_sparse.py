"""Block-sparse memory (issue 15): decode step cost against memory size, dense vs sparse, and quality.

    python bench/bench_sparse.py [--memories 0,65536,1048576] [--budget 2048] [--more-budgets 4096] [--block 32]
                                 [--steps 12] [--repeats 2] [--host-10m DIR] [--quality]
                                 [--two-level-quality]
                                 [--json bench/results/sparse.json]

The default model (SmolLM2-135M as LongLLaMA with its memory delta) on the CPU, float32 with the
engine's bfloat16 decode copies. Memory: the real memory of the `requests` package (16k tokens,
encoded once), tiled up to each size (the cost of a step does not depend on which keys repeat).
Speed: median ms of a one-token step after a 900-token prefix, every configuration alternating
`--repeats` times in one process. --host-10m DIR: a 10M-token memory whose keys/values are
memory-mapped from files in DIR (the host tier; ~23 GB of sparse files: pages never written read as
zeros from the page cache, so this is a lower bound of a real disk read) with summaries in memory.
--quality: held-out loss of requests/sessions.py (first 1,024 tokens, one window) with the rest of
the package in memory: none, dense, and sparse at budgets 512..8192 and blocks 16/32/64.
--two-level-quality: the same loss with the two-level selection (groups of blocks first) forced on
at 16k tokens, groups of 2..16 blocks, against the flat selection: what the coarse level loses.
Speed runs time both selections where they differ (memories above 4,096 blocks: "sparse-flat").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import machine_facts  # noqa: E402

from longllama_lsp.load import load_model_and_tokenizer  # noqa: E402
from longllama_lsp.model import attention  # noqa: E402
from longllama_lsp.model.memory import BlockSummary, MemCache, Memory  # noqa: E402

DEFAULT_COARSE_FROM, DEFAULT_GROUP = attention.COARSE_FROM_BLOCKS, attention.COARSE_GROUP

REPO = Path("/work/data/eval/requests/requests")
HELD_OUT = "sessions.py"


@torch.inference_mode()
def repo_memory(model, tokenizer, tokens: int, exclude: str = HELD_OUT) -> Memory:
    """The package's files (but `exclude`), each encoded on its own (as the index does), up to `tokens`."""
    parts, total = [], 0
    for f in sorted(REPO.glob("*.py")):
        if f.name == exclude:
            continue
        ids = tokenizer(f.read_text(), return_tensors="pt")["input_ids"][:, :tokens - total]
        for s in range(0, ids.shape[1], 2048):
            parts.append(model.encode_memory(ids[:, s:s + 2048]))
        total += ids.shape[1]
        if total >= tokens:
            break
    return Memory.concat(parts)


def tiled(memory: Memory, tokens: int) -> Memory:
    """`memory` repeated to exactly `tokens` slots (a fresh MemCache per layer: summaries built anew)."""
    reps = -(-tokens // memory.num_tokens)
    return Memory({i: MemCache(c.keys.repeat(1, 1, reps, 1)[:, :, :tokens],
                               c.values.repeat(1, 1, reps, 1)[:, :, :tokens],
                               c.mask.repeat(1, 1, reps, 1)[:, :, :tokens]) for i, c in memory.items()})


def host_memory(memory: Memory, tokens: int, directory: Path, block: int) -> Memory:
    """A `tokens`-slot memory whose keys/values are memory-mapped files (never written: holes) and
    whose summaries are the real memory's, tiled (what the bank would hold on the device)."""
    import numpy as np

    out = {}
    for i, c in memory.items():
        _, h, _, d = c.keys.shape
        raw = []
        for name in ("keys", "values"):
            path = directory / f"layer{i}-{name}.mem"
            mm = np.memmap(path, dtype=np.int16, mode="w+", shape=(1, h, tokens, d))
            raw.append(torch.from_numpy(mm).view(torch.bfloat16))
        small = BlockSummary.of(c.keys, block)
        reps = -(-tokens // block // small.num_blocks)
        nb = -(-tokens // block)
        summary = BlockSummary(block, small.kmin.repeat(1, 1, reps, 1)[:, :, :nb].float(),
                               small.kmax.repeat(1, 1, reps, 1)[:, :, :nb].float())
        out[i] = MemCache(raw[0], raw[1], torch.zeros(1, 1, tokens, 1), summary)
    return Memory(out)


@torch.inference_mode()
def step_ms(model, memory: Memory | None, steps: int, prefix: int = 900) -> float:
    """Median ms of a one-token step with `prefix` cached tokens and `memory`."""
    ids = torch.randint(0, model.config.vocab_size, (1, prefix))
    cache = model(ids, use_cache=True, last_context_length=model.window, logits_to_keep=1).past_key_values
    cache.memory = memory if memory is not None else Memory({})  # as the engine swaps memory in
    token, times = torch.tensor([[5]]), []
    for _ in range(steps + 1):  # the first step builds what is kept (summaries in the compute dtype)
        t0 = time.perf_counter()
        cache = model(token, past_key_values=cache, use_cache=True, last_context_length=model.window,
                      logits_to_keep=1).past_key_values
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def configure(model, block: int, budget: int | None, flat: bool = False) -> None:
    """Dense (budget None) or sparse; `flat`: one-level selection at every size (no group summaries)."""
    model.config.mem_block_size, model.config.mem_budget = block, budget
    attention.COARSE_FROM_BLOCKS = 2**62 if flat else DEFAULT_COARSE_FROM


def speed(model, base: Memory, sizes: list[int], budget: int, block: int, steps: int, repeats: int,
          dense_max: int, more_budgets: Sequence[int] = ()) -> dict:
    """Median ms per step for each size and mode; `more_budgets`: modes `sparse@N` at those budgets too."""
    memories = {m: tiled(base, m) if m else None for m in sizes}
    two_level = [m for m in sizes if m > block * DEFAULT_COARSE_FROM]  # where flat and two-level differ
    runs = [(m, mode) for m in sizes for mode in (("dense", "sparse") if m else ("none",))
            if mode != "dense" or m <= dense_max] + [(m, "sparse-flat") for m in two_level]
    runs += [(m, f"sparse@{b}") for m in sizes if m for b in more_budgets]
    times: dict[str, list[float]] = {f"{m}/{mode}": [] for m, mode in runs}
    for r in range(repeats):
        for m, mode in runs:
            b = int(mode.split("@")[1]) if "@" in mode else budget
            configure(model, block, b if mode.startswith("sparse") else None, flat=mode == "sparse-flat")
            ms = step_ms(model, memories[m], steps)
            times[f"{m}/{mode}"].append(ms)
            print(f"repeat {r + 1}: {m:>8} tokens {mode:>6}: {ms:8.1f} ms  (load {os.getloadavg()[0]:.1f})",
                  file=sys.stderr, flush=True)
    return {k: round(statistics.median(v), 1) for k, v in times.items()}


def held_out_ids(tokenizer) -> torch.Tensor:
    return tokenizer((REPO / HELD_OUT).read_text(), return_tensors="pt")["input_ids"][:, :1024]  # (1, 1024)


def held_out_loss(model, ids: torch.Tensor, memory: Memory | None) -> float:
    """Loss of `ids` with `memory` as the model is configured now (a fresh MemCache per layer: no
    summaries kept from another configuration)."""
    fresh = None if memory is None else Memory({i: MemCache(c.keys, c.values, c.mask) for i, c in memory.items()})
    return round(float(model(ids, memory=fresh, labels=ids).loss), 4)


@torch.inference_mode()
def quality(model, tokenizer, base: Memory, budgets: list[int], blocks: list[int]) -> dict:
    ids = held_out_ids(tokenizer)

    def loss(memory, block=32, budget=None):
        configure(model, block, budget)
        return held_out_loss(model, ids, memory)

    out = {"memory_tokens": base.num_tokens, "none": loss(None), "dense": loss(base)}
    for block in blocks:
        for budget in budgets:
            if budget < base.num_tokens:
                out[f"block{block}/budget{budget}"] = loss(base, block, budget)
    return out


@torch.inference_mode()
def two_level_quality(model, tokenizer, base: Memory, budgets: list[int], groups: list[int]) -> dict:
    """Held-out loss with the two-level selection forced on at this memory's size (groups of `group`
    blocks of 32), against the flat selection at the same budget: what the coarse level loses."""
    ids = held_out_ids(tokenizer)

    def loss(budget, group=None):
        configure(model, 32, budget, flat=group is None)
        if group is not None:
            attention.COARSE_GROUP, attention.COARSE_FROM_BLOCKS = group, 0
        out = held_out_loss(model, ids, base)
        attention.COARSE_GROUP, attention.COARSE_FROM_BLOCKS = DEFAULT_GROUP, DEFAULT_COARSE_FROM
        return out

    out = {"memory_tokens": base.num_tokens}
    for budget in budgets:
        out[f"budget{budget}/flat"] = loss(budget)
        for group in groups:
            out[f"budget{budget}/group{group}"] = loss(budget, group)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memories", default="0,65536,1048576", help="memory sizes in tokens (0 = none)")
    ap.add_argument("--budget", type=int, default=2048, help="sparse budget in tokens for the speed runs")
    ap.add_argument("--block", type=int, default=32, help="block size for the speed runs")
    ap.add_argument("--more-budgets", default="", metavar="N,...",
                    help="speed runs also at these sparse budgets, alternating with the others (modes sparse@N)")
    ap.add_argument("--memory-tokens", type=int, default=16384, help="real memory encoded (quality; tiled for speed)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dense-max", type=int, default=2**20, help="largest memory also timed dense (dense is linear)")
    ap.add_argument("--host-10m", type=Path, default=None, metavar="DIR",
                    help="also time a 10M-token host-tier (memory-mapped) memory with files in DIR")
    ap.add_argument("--quality", action="store_true", help="held-out loss: none, dense, sparse budgets/blocks")
    ap.add_argument("--two-level-quality", action="store_true",
                    help="held-out loss, flat vs two-level selection forced on (budgets 512/2048, groups 2..16)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model, tokenizer, path = load_model_and_tokenizer(device="cpu")
    t0 = time.perf_counter()
    base = repo_memory(model, tokenizer, args.memory_tokens)
    print(f"encoded {base.num_tokens} memory tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    result = {"model": str(path), "machine": machine_facts(), "budget": args.budget, "block": args.block}
    if args.quality:
        result["quality_loss"] = quality(model, tokenizer, base, [512, 1024, 2048, 4096, 8192], [16, 32, 64])
        print(json.dumps(result["quality_loss"], indent=1), file=sys.stderr, flush=True)
    if args.two_level_quality:
        result["two_level_loss"] = two_level_quality(model, tokenizer, base, [512, 2048], [2, 4, 8, 16])
        print(json.dumps(result["two_level_loss"], indent=1), file=sys.stderr, flush=True)
    sizes = [int(x) for x in args.memories.split(",")]
    more = [int(x) for x in args.more_budgets.split(",")] if args.more_budgets else []
    result["step_ms"] = speed(model, base, sizes, args.budget, args.block, args.steps, args.repeats, args.dense_max,
                              more)
    if args.host_10m is not None:
        args.host_10m.mkdir(parents=True, exist_ok=True)
        host = host_memory(base, 10 * 2**20, args.host_10m, args.block)
        configure(model, args.block, args.budget)
        result["step_ms"]["10485760/sparse-host"] = round(step_ms(model, host, args.steps), 1)
        configure(model, args.block, None)
        result["step_ms"]["0/none-again"] = round(step_ms(model, None, args.steps), 1)
        for f in args.host_10m.glob("*.mem"):
            f.unlink()
    result["machine"]["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
