"""Whether a trained memory delta may replace the shipped one (issue 16's rule, and what withdrew run 2).

    python bench/ship_check.py --guard CURRENT-guard.json CANDIDATE-guard.json \
        --crossfile CURRENT-crossfile.json:c CANDIDATE-crossfile.json:d

Inputs: `longllama eval --task guard --json` of each model (held-out perplexity without memory), and
`bench/crossfile/run.py --json` runs over all 60 holes with repository memory, each named with the
system that ran the model (c: the default model, d: `--model CANDIDATE`).

The rule: perplexity without memory within +1% of the current delta's (the issue's rule), and with
memory on the 60 holes, edit similarity and identifier exact match not below the current delta's.
Run 2's delta passed the first (-3.5%) and failed the second (ES 0.374 -> 0.350, identifier EM
0.117 -> 0.083): completions with memory are what users get, so they decide.
Exit status: 0 ship, 1 keep the current delta, 2 the inputs cannot decide (missing holes, wrong files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GUARD_LIMIT = 1.01  # candidate perplexity / current perplexity
HOLES = 60
METRICS = (("es", "edit similarity"), ("id_em", "identifier exact match"))


class Undecidable(ValueError):
    """The inputs do not measure what the rule needs."""


def guard_perplexity(report: dict) -> float:
    try:
        return float(report["guard"]["perplexity"])
    except (KeyError, TypeError, ValueError):
        raise Undecidable("not a `longllama eval --task guard --json` report (no guard.perplexity)") from None


def crossfile_summary(report: dict, system: str) -> dict:
    row = report.get("summary", {}).get(f"{system}/all")
    if row is None:
        raise Undecidable(f"no system {system!r} in the crossfile report (has {sorted(report.get('summary', {}))[:6]})")
    if row.get("n") != HOLES:
        raise Undecidable(f"system {system!r} ran {row.get('n')} holes, the rule needs all {HOLES}")
    return row


def verdict(current_ppl: float, candidate_ppl: float, current: dict, candidate: dict) -> tuple[bool, list[str]]:
    """(ship?, one line per check) from the two perplexities and the two crossfile summaries."""
    ratio = candidate_ppl / current_ppl
    lines = [f"{'ok  ' if ratio <= GUARD_LIMIT else 'FAIL'} perplexity without memory {current_ppl:.4f} -> "
             f"{candidate_ppl:.4f} ({ratio - 1:+.1%}, limit {GUARD_LIMIT - 1:+.0%})"]
    ok = ratio <= GUARD_LIMIT
    for key, name in METRICS:
        fine = candidate[key] >= current[key]
        ok &= fine
        lines.append(f"{'ok  ' if fine else 'FAIL'} {name} with memory, {HOLES} holes: {current[key]:.3f} -> "
                     f"{candidate[key]:.3f}")
    return ok, lines


def _report(spec: str) -> tuple[dict, str | None]:
    path, _, system = spec.partition(":")
    try:
        return json.loads(Path(path).read_text()), system or None
    except (OSError, ValueError) as exc:
        raise Undecidable(f"{path}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guard", nargs=2, required=True, metavar=("CURRENT", "CANDIDATE"))
    p.add_argument("--crossfile", nargs=2, required=True, metavar=("CURRENT:SYS", "CANDIDATE:SYS"))
    args = p.parse_args(argv)
    try:
        ppl = [guard_perplexity(_report(g)[0]) for g in args.guard]
        rows = []
        for spec in args.crossfile:
            report, system = _report(spec)
            if system is None:
                raise Undecidable(f"{spec}: name the system that ran the model (FILE:c or FILE:d)")
            rows.append(crossfile_summary(report, system))
    except Undecidable as exc:
        print(f"ship_check: cannot decide: {exc}", file=sys.stderr)
        return 2
    ok, lines = verdict(ppl[0], ppl[1], rows[0], rows[1])
    print("\n".join(lines))
    print("ship the candidate" if ok else "keep the current delta")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
