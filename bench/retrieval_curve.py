"""Issue 16: the retrieval training curve as BENCHMARKS.md tables, from a run directory and eval JSONs.

    python bench/retrieval_curve.py --run runs/retrieval-cpu --every 10 \
        --eval step0=results/shipped --eval step30=results/step30

Training curve: `metrics.jsonl` of `longllama train` on a [retrieval] recipe. Each step's examples are
new (never trained on before that step), so the per-kind NLL and top-1 accuracy of the flagged
tokens (the answer, the key, the cross-file identifiers) before the update is an online held-out
measure (progressive validation), averaged over blocks of `--every` steps, weighted by token count.
"plain NLL" is the guard term's no-memory NLL of plain training code (runs with `lm_rows`; else -).
Eval: for each NAME=PREFIX, PREFIX-passkey.json, PREFIX-guard.json, PREFIX-crossfile.json written
by `longllama eval --task passkey|guard|crossfile-ids --json` (missing ones are shown as -).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KINDS = ("repo", "synthetic", "passkey")


def curve(run: Path, every: int) -> list[str]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["step"] for r in rows)
    out = ["| steps | examples | " + " | ".join(f"{k} NLL | {k} top-1" for k in KINDS) + " | plain NLL | loss | s/step |",
           "|---|---|" + "---|---|" * len(KINDS) + "---|---|---|"]
    for lo in range(1, last + 1, every):
        sel = [r for r in rows if lo <= r["step"] < lo + every]
        cells = []
        for k in KINDS:
            n = sum(r.get(f"{k}_n", 0) for r in sel)
            if n:
                nll = sum(r[f"{k}_nll"] * r[f"{k}_n"] for r in sel if f"{k}_n" in r) / n
                acc = sum(r[f"{k}_acc"] * r[f"{k}_n"] for r in sel if f"{k}_n" in r) / n
                cells += [f"{nll:.2f}", f"{100 * acc:.0f}% ({n})"]
            else:
                cells += ["-", "-"]
        plain = [r["lm_nll"] for r in sel if "lm_nll" in r]
        cells.append(f"{sum(plain) / len(plain):.3f}" if plain else "-")
        loss = sum(r["loss"] for r in sel) / len(sel)
        step_s = sum(r["step_s"] for r in sel) / len(sel)
        out.append(f"| {lo}-{sel[-1]['step']} | {sel[-1]['examples']} | " + " | ".join(cells)
                   + f" | {loss:.3f} | {step_s:.0f} |")
    return out


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def evals(items: list[str]) -> list[str]:
    out = ["| model | passkey 4k | 16k | 64k | key in memory | guard ppl (no memory) | xid NLL none | memory | bm25 "
           "| xid top-1 none | memory | bm25 |", "|---|" + "---|" * 11]
    for item in items:
        name, _, prefix = item.partition("=")
        pk, guard, cf = (_load(Path(f"{prefix}-{t}.json")) for t in ("passkey", "guard", "crossfile"))
        cells = []
        if pk and "passkey" in pk:
            p = pk["passkey"]
            lengths = [k for k in p if k.isdigit()]
            cells += [f"{p[k]['correct']}/{p[k]['trials']}" for k in lengths] + ["-"] * (3 - len(lengths))
            cells.append(f"{sum(p[k]['correct_in_memory'] for k in lengths)}/{sum(p[k]['in_memory'] for k in lengths)}")
        else:
            cells += ["-"] * 4
        cells.append(f"{guard['guard']['perplexity']:.4f}" if guard and "guard" in guard else "-")
        if cf and "crossfile-ids" in cf:
            s = cf["crossfile-ids"]["systems"]
            cells += [f"{s[x]['xid_nll']:.3f}" for x in ("none", "memory", "bm25")]
            cells += [f"{100 * s[x]['xid_top1']:.1f}%" for x in ("none", "memory", "bm25")]
        else:
            cells += ["-"] * 6
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="training run dir (metrics.jsonl)")
    p.add_argument("--every", type=int, default=10, help="steps per row of the training curve")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=PREFIX", help="eval JSONs (repeatable)")
    args = p.parse_args(argv)
    if args.run:
        print("\n".join(curve(args.run, args.every)))
    if args.eval:
        print("\n".join(evals(args.eval)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
