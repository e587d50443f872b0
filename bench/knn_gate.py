"""Where the kNN lookup changes the model's greedy choice, and whether the model's own confidence says when to trust it.

    python bench/knn_gate.py --repo /work/data/eval/itsdangerous --repo .../marshmallow --repo .../starlette \
        --budget 512 --span-len 128 --chunk-len 256 --retrieve-tokens 4096 --files-per-repo 4 \
        --spans-per-file 3 --select-tokens 2048 --out bench/results/knn-gate-s48.json

    python bench/knn_gate.py --weights bench/results/knn-gate-s48.pt   (other weights, offline, from the
        positions the run saved beside --out: 5 MB, not committed)

Runs `longllama eval --task crossfile-ids` with the systems `retrieved` and `knn` only and, at every scored
token, compares the argmax of the retrieved forward pass (p_model) with the argmax of the lookup's mixture
(0.7 p_model + 0.3 p_knn, the engine's). Each position where they differ is a *flip*; it is counted by the
model's top probability there (bins), as right (the mixture's token is the target), wrong (the model's token
was) or neither. A gate "no lookup where p_model's top >= t" keeps the flips below t: the table says what each
t would gain and lose, teacher-forced, before any completion is run. Bench only: nothing here is in the product.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune import skill_eval  # noqa: E402
from finetune.commands import _eval_args  # noqa: E402

BINS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)


class Flips:
    """Flip counts by the model's top probability; tokens split as all / cross-file identifier / a name's first."""

    def __init__(self) -> None:
        self.rows = {kind: [[0, 0, 0, 0] for _ in BINS[:-1]] for kind in ("all", "xid", "first")}  # tokens, right, wrong, neither

    def add(self, logp: torch.Tensor, mixed: torch.Tensor, target: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        """logp, mixed (T, V) at the target positions; target (T,)."""
        top_p, model_tok = logp.exp().max(-1)  # (T,)
        mixed_tok = mixed.argmax(-1)  # (T,)
        flip = model_tok != mixed_tok
        b = torch.bucketize(top_p, torch.tensor(BINS[1:-1]), right=True)  # (T,) bin index
        for kind, mask in masks.items():
            for i in range(len(BINS) - 1):
                at = mask & (b == i)
                row = self.rows[kind][i]
                row[0] += int(at.sum())
                row[1] += int((at & flip & (mixed_tok == target)).sum())
                row[2] += int((at & flip & (model_tok == target)).sum())
                row[3] += int((at & flip & (mixed_tok != target) & (model_tok != target)).sum())

    def table(self) -> str:
        out = []
        for kind, rows in self.rows.items():
            out.append(f"\n{kind} tokens: model top-p bin | tokens | flips right | flips wrong | flips neither | "
                       "net if gated off from this bin up")
            for i, (n, r, w, x) in enumerate(rows):
                above = rows[i:]
                net = sum(a[2] - a[1] for a in above)  # gating bins >= i off: wrong flips undone minus right ones lost
                out.append(f"  [{BINS[i]:.1f}, {min(BINS[i + 1], 1):.1f}) | {n} | {r} | {w} | {x} | {net:+d}")
        return "\n".join(out)


def _positions(logp: torch.Tensor, mixed: torch.Tensor, target: torch.Tensor, masks: dict[str, torch.Tensor],
               weight: float = 0.3, top: int = 32) -> dict[str, torch.Tensor]:
    """What another weight's mixture needs at each scored position (T of them): the model's `top` best tokens and
    log-probabilities (T, top), the vote p_knn (T, V) as a sparse tensor (recovered from the mixture at `weight`),
    the target (T,) and the masks."""
    p = logp.exp()
    p_knn = ((mixed.exp() - (1 - weight) * p) / weight).clamp_min(0)
    p_knn[p_knn < 1e-4] = 0  # the mixture's 1e-30 floor and rounding; a real vote share is >= 1/K-ish
    top_lp, top_ids = logp.topk(top, -1)
    return {"top_lp": top_lp, "top_ids": top_ids, "p_knn": p_knn.to_sparse(), "target": target,
            **{f"mask_{k}": m for k, m in masks.items()}}


# Lookup weights by the model's top probability p: constant, raised where the model is unsure, lowered where sure.
WEIGHTS = {
    "0.0": lambda p: torch.zeros_like(p), "0.2": lambda p: torch.full_like(p, 0.2),
    "0.3 (shipped)": lambda p: torch.full_like(p, 0.3), "0.4": lambda p: torch.full_like(p, 0.4),
    "0.5": lambda p: torch.full_like(p, 0.5),
    "0.5 where p < 0.3": lambda p: torch.where(p < 0.3, 0.5, 0.3), "0.5 where p < 0.5": lambda p: torch.where(p < 0.5, 0.5, 0.3),
    "0.4 where p < 0.4": lambda p: torch.where(p < 0.4, 0.4, 0.3), "0.6 where p < 0.2": lambda p: torch.where(p < 0.2, 0.6, 0.3),
    "0.15 where p >= 0.5": lambda p: torch.where(p >= 0.5, 0.15, 0.3), "0.15 + 0.45 (1 - p)": lambda p: 0.15 + 0.45 * (1 - p),
}


def weights_table(saved: list[dict[str, torch.Tensor]]) -> str:
    """Top-1 hits of each WEIGHTS rule at the saved positions, and the difference from the shipped 0.3. The model's
    distribution is its saved top tokens (a token outside them and voted for counts as p = 0: an argmax needs
    no more)."""
    kinds = ("all", "xid", "first")
    hits = {name: dict.fromkeys(kinds, 0) for name in WEIGHTS}
    n = dict.fromkeys(kinds, 0)
    for s in saved:
        p_knn = s["p_knn"].to_dense()  # (T, V)
        p = torch.zeros_like(p_knn).scatter_(1, s["top_ids"], s["top_lp"].exp())  # (T, V)
        top_p = s["top_lp"][:, 0].exp()  # (T,)
        for kind in kinds:
            n[kind] += int(s[f"mask_{kind}"].sum())
        for name, rule in WEIGHTS.items():
            w = rule(top_p)[:, None]
            right = ((1 - w) * p + w * p_knn).argmax(-1) == s["target"]
            for kind in kinds:
                hits[name][kind] += int((right & s[f"mask_{kind}"]).sum())
    base = hits["0.3 (shipped)"]
    lines = [f"top-1 hits of {n['all']} tokens ({n['xid']} cross-file identifier, {n['first']} first tokens)"]
    lines += [f"  {name:22s} " + "   ".join(f"{k} {h[k]} ({h[k] - base[k]:+d})" for k in kinds) for name, h in hits.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _eval_args(p)  # longllama eval's own options
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: beside other jobs)")
    p.add_argument("--out", type=Path, help="JSON: the flip table and the eval's own result (and OUT.pt: the positions)")
    p.add_argument("--weights", type=Path, metavar="PT", help="run nothing: the WEIGHTS table from a run's saved positions")
    args = p.parse_args(["--task", "crossfile-ids", *(argv if argv is not None else sys.argv[1:])])
    if args.weights:
        print(weights_table(torch.load(args.weights, weights_only=True)))
        return 0
    if args.out is None:
        p.error("give --out (or --weights)")
    flips = Flips()
    saved: list[dict[str, torch.Tensor]] = []
    pending: dict[str, torch.Tensor] = {}
    mix = skill_eval.EvalLookup.mix

    def stash_mix(self, logp, memory, chunks):
        out = mix(self, logp, memory, chunks)
        pending["logp"], pending["mixed"] = logp, out
        return out

    tally = skill_eval._tally

    def tally_flips(logp, prompts, targets, flags, starts, *scores):
        if pending and logp is pending.get("mixed"):
            for i, (pr, t) in enumerate(zip(prompts, targets, strict=True)):
                pos = torch.arange(len(pr) - 1, len(pr) - 1 + len(t))
                masks = {"all": torch.ones(len(t), dtype=torch.bool), "xid": torch.tensor(flags[i]),
                         "first": torch.tensor(starts[i])}
                scored = (pending["logp"][i, pos], logp[i, pos], torch.tensor(t), masks)
                flips.add(*scored)
                saved.append(_positions(*scored))
            pending.clear()
        return tally(logp, prompts, targets, flags, starts, *scores)

    skill_eval.EvalLookup.mix = stash_mix
    skill_eval._tally = tally_flips
    skill_eval.eval_crossfile = functools.partial(skill_eval.eval_crossfile, systems=("retrieved", "knn"))
    args.json_out = str(args.out)
    torch.set_num_threads(args.threads)
    rc = skill_eval.run(args)
    print(flips.table())
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["flips"] = {"bins": BINS, **flips.rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    torch.save(saved, args.out.with_suffix(".pt"))  # for other weights offline: see `_positions`
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
