"""Make a merged LoRA delta compact again: earlier pairs + the SVD of the new run's change.

    python bench/compact_delta.py --base BASE_DIR --previous OLD_ADAPTER --merged NEW_ADAPTER \
        --rank 16 --out OUT.safetensors

A LoRA run that starts from the bundled default (model.path unset) merges the default's delta on
load, so its output holds every adapted weight as a full replacement (~425 MB on SmolLM2). Its change
to each weight is still low-rank (the LoRA it trained): for each weight with a pair in OLD_ADAPTER,
W_new - (W_base + up @ down) is factored by SVD and its top `rank` components are stacked beside the
old pair (ranks concatenated, scales folded into lora_up); replacements of the merged file are kept
as replacements. Refuses (exit 1) when any rebuilt weight differs from NEW_ADAPTER's by more than
--tolerance: the change was not of that rank. How the shipped stage 4 was made (CPU run 11).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DOWN, UP = ".lora_down", ".lora_up"


def compact(base: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], merged: dict[str, torch.Tensor],
            rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """(the compact delta, the largest |rebuilt - merged| over all weights)."""
    out: dict[str, torch.Tensor] = {}
    worst = 0.0
    for name, w_new in merged.items():
        if name + DOWN not in previous:
            out[name] = w_new.contiguous()
            continue
        up0, down0 = previous[name + UP].float(), previous[name + DOWN].float()  # (out, r0), (r0, in)
        before = base[name].float() + up0 @ down0  # (out, in)
        u, s, vh = torch.linalg.svd((w_new.float() - before).double(), full_matrices=False)
        up = torch.cat([up0, (u[:, :rank] * s[:rank]).float()], 1).contiguous()  # (out, r0 + rank)
        down = torch.cat([down0, vh[:rank].float()], 0).contiguous()  # (r0 + rank, in)
        worst = max(worst, float((base[name].float() + up @ down - w_new.float()).abs().max()))
        out[name + UP], out[name + DOWN] = up, down
    return out, worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the converted base model folder (model.safetensors)")
    p.add_argument("--previous", type=Path, required=True, help="the delta the run started from (with pairs)")
    p.add_argument("--merged", type=Path, required=True, help="the run's output delta (full replacements)")
    p.add_argument("--rank", type=int, default=16, help="the run's LoRA rank")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    out, worst = compact(load_file(a.base / "model.safetensors"), load_file(a.previous), load_file(a.merged), a.rank)
    print(f"{len(out)} tensors; largest difference from the merged weights {worst:.2e}")
    if worst > a.tolerance:
        print(f"compact_delta: over --tolerance {a.tolerance}: the change is not of rank {a.rank}", file=sys.stderr)
        return 1
    save_file(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
