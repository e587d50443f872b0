"""Make a merged LoRA delta compact again: earlier pairs + the SVD of the new run's change.

    python bench/compact_delta.py --base BASE_DIR --previous OLD_ADAPTER --merged NEW_ADAPTER \
        --rank 16 --out OUT.safetensors

A LoRA run that starts from the bundled default (model.path unset) merges the default's delta on
load, so its output holds every adapted weight as a full replacement (~425 MB on SmolLM2). Its change
to each weight is still low-rank (the LoRA it trained): for each weight with a pair in OLD_ADAPTER,
W_new - (W_base + up @ down) is factored by SVD and its top `rank` components are stacked beside the
old pair (`loading.stack_weight_deltas`: ranks concatenated, scales folded into lora_up); replacements of the merged file are kept
as replacements. Refuses (exit 1) when any rebuilt weight differs from NEW_ADAPTER's by more than
--tolerance: the change was not of that rank. How the shipped stage 4 was made (CPU run 11).

    python bench/compact_delta.py --previous OLD_ADAPTER --pairs NEW_ADAPTER --out OUT.safetensors

A run whose delta is already low-rank pairs on top of OLD_ADAPTER (a LoRA checkpoint's delta/ written
since finetune.outputs.lora_delta applies the base's own adapter first: stage 5, CPU run 14 of
stop 35) needs no SVD: its pairs are stacked beside the old ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from longllama_lsp.model.loading import (
    LOW_RANK_DOWN,
    LOW_RANK_UP,
    add_low_rank,
    split_weight_delta,
    stack_weight_deltas,
)


def run_change(base: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], merged: dict[str, torch.Tensor],
               rank: int) -> dict[str, torch.Tensor]:
    """The run's own change as a delta to apply after `previous`: a rank-`rank` pair (the top of the SVD)
    for each weight `previous` holds a pair of, the merged weight as a replacement for the rest."""
    _, pairs = split_weight_delta(previous)
    change: dict[str, torch.Tensor] = {}
    for name, w_new in merged.items():
        if len(pairs.get(name, {})) != 2:
            change[name] = w_new.contiguous()
            continue
        before = add_low_rank(base[name].float(), pairs[name])  # (out, in)
        u, s, vh = torch.linalg.svd((w_new.float() - before).double(), full_matrices=False)
        change[name + LOW_RANK_UP] = (u[:, :rank] * s[:rank]).float().contiguous()  # (out, rank)
        change[name + LOW_RANK_DOWN] = vh[:rank].float().contiguous()  # (rank, in)
    return change


def largest_error(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> float:
    """max |base + up @ down - merged| over the weights `delta` holds as pairs (its replacements are exact)."""
    _, pairs = split_weight_delta(delta)
    return max((float((add_low_rank(base[n].float(), p) - merged[n].float()).abs().max()) for n, p in pairs.items()),
               default=0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, help="the converted base model folder (model.safetensors; with --merged)")
    p.add_argument("--previous", type=Path, required=True, help="the delta the run started from (with pairs)")
    new = p.add_mutually_exclusive_group(required=True)
    new.add_argument("--merged", type=Path, help="the run's output delta (full replacements)")
    new.add_argument("--pairs", type=Path, help="the run's delta as low-rank pairs applied after --previous")
    p.add_argument("--rank", type=int, default=16, help="the run's LoRA rank")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.merged is not None and a.base is None:
        p.error("--merged needs --base")
    previous = load_file(a.previous)
    if a.pairs is not None:
        out = {name: t.contiguous() for name, t in stack_weight_deltas(previous, load_file(a.pairs)).items()}
        print(f"{len(out)} tensors: {a.previous}'s then {a.pairs}'s, pairs of one name stacked")
        save_file(out, a.out)
        return 0
    base, merged = load_file(a.base / "model.safetensors"), load_file(a.merged)
    out = {name: t.contiguous() for name, t in stack_weight_deltas(previous, run_change(base, previous, merged, a.rank)).items()}
    worst = largest_error(base, out, merged)
    print(f"{len(out)} tensors; largest difference from the merged weights {worst:.2e}")
    if worst > a.tolerance:
        print(f"compact_delta: over --tolerance {a.tolerance}: the change is not of rank {a.rank}", file=sys.stderr)
        return 1
    save_file(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
