"""Paired comparison of two `run.py --json` reports over the same holes (how BENCHMARKS compares checkpoints).

    python bench/crossfile/paired.py BASE.json:CANDIDATE.json [BASE2.json:CANDIDATE2.json ...] [--json OUT]

For each pair: the candidate's edit similarity minus the base's, hole by hole (each report's one system),
mean +- standard error, how many holes got better / worse; then the same pooled over every pair (the
first + seed-9 sets together are "120 holes"), with identifier exact matches and cross-file identifier
hits counted on each side. Holes must be the same in both reports of a pair: a pair that differs is an
error (exit 2), not a smaller comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Paired:
    n: int
    mean: float  # candidate ES - base ES, per hole
    se: float  # standard error of that mean
    better: int
    worse: int
    id_em: tuple[int, int]  # (base, candidate) identifier exact matches
    xid_hit: tuple[int, int]  # (base, candidate) holes whose cross-file identifier was produced


def records(path: Path) -> dict[tuple[str, str], dict]:
    """(hole id, expected text) -> metrics of a report's one system (ids repeat across hole sets)."""
    report = json.loads(path.read_text())
    systems = {r["system"] for r in report["records"]}
    if len(systems) != 1:
        raise ValueError(f"{path}: holds systems {sorted(systems)}; give a report of one system")
    return {(r["id"], r["expected"]): r["metrics"] for r in report["records"]}


def compare(pairs: list[tuple[dict, dict]]) -> Paired:
    diffs, em, xid = [], [0, 0], [0, 0]
    for base, cand in pairs:
        for hole in sorted(base):
            diffs.append(cand[hole]["es"] - base[hole]["es"])
            for side, m in enumerate((base[hole], cand[hole])):
                em[side] += round(m["id_em"])
                xid[side] += round(m.get("xid_hit", 0))
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return Paired(n, mean, se, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), tuple(em), tuple(xid))


def line(name: str, p: Paired) -> str:
    return (f"{name}: n={p.n} ES {p.mean:+.4f} +- {p.se:.4f} ({p.better} better, {p.worse} worse); "
            f"identifier EM {p.id_em[0]} -> {p.id_em[1]}; cross-file id {p.xid_hit[0]} -> {p.xid_hit[1]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="+", metavar="BASE.json:CANDIDATE.json")
    ap.add_argument("--json", type=Path, help="also write the comparisons here")
    args = ap.parse_args(argv)
    loaded, out = [], {}
    try:
        for pair in args.pairs:
            base, sep, cand = pair.rpartition(":")
            if not sep or not base:
                raise ValueError(f"{pair}: expected BASE.json:CANDIDATE.json")
            a, b = records(Path(base)), records(Path(cand))
            if set(a) != set(b):
                raise ValueError(f"{pair}: the reports hold different holes ({len(set(a) ^ set(b))} differ)")
            loaded.append((a, b))
            out[pair] = compare([(a, b)])
            print(line(pair, out[pair]))
    except (OSError, ValueError, KeyError) as exc:
        print(f"paired.py: {exc}", file=sys.stderr)
        return 2
    if len(loaded) > 1:
        out["pooled"] = compare(loaded)
        print(line("pooled", out["pooled"]))
    if args.json:
        args.json.write_text(json.dumps({k: asdict(v) for k, v in out.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
