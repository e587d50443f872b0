"""What the one-process completion probes (punct_heal.py, new_line.py) share: their options, engine, sample of
positions, loop and tally."""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longllama_lsp.engine import Engine, EngineOptions


def probe_arguments(doc: str, n: int, n_help: str) -> argparse.Namespace:
    """--data (the folder of held-out repositories), --repos, --n positions per group, --seed, --out (JSON lines)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/work/data/eval"))
    p.add_argument("--repos", default="requests,flask,click")
    p.add_argument("--n", type=int, default=n, help=n_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def sample(groups: dict[str, list[tuple]], n: int, seed: int) -> list[tuple]:
    """Up to `n` positions of each group, drawn with `seed`, each as (group, *position)."""
    rng = random.Random(seed)
    return [(g, *x) for g, xs in groups.items() for x in rng.sample(xs, min(n, len(xs)))]


@dataclass
class Place:
    """Where a probe completes: the file, its text as the editor holds it, the cursor, the JSON row (with
    "expected", the text a completion should write)."""

    path: Path
    text: str
    offset: int
    row: dict


def probe_engine() -> Engine:
    """The default model, no memory, line mode, 32 tokens, no typeahead (each completion runs the model), ready."""
    eng = Engine.load(None, options=EngineOptions(max_tokens=32, memory=False, typeahead=False))
    eng.wait_ready()
    return eng


class Tally:
    """Per (group, mode): completions, empty ones, exact lines, summed edit similarity and seconds."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], list[float]] = {}

    def add(self, group: str, mode: str, got: str, expected: str, seconds: float) -> None:
        from metrics import edit_similarity  # bench/crossfile, on the probes' sys.path

        got, expected = got.strip(), expected.strip()
        row = self.rows.setdefault((group, mode), [0, 0, 0, 0.0, 0.0])
        row[0] += 1
        row[1] += not got
        row[2] += got == expected
        row[3] += edit_similarity(got, expected)
        row[4] += seconds

    def report(self) -> str:
        return "\n".join(f"{group:11s} {mode:10s} n={n:4d} empty {empty:4d}  exact {exact:4d} ({exact / n:.3f})  "
                         f"ES {es / n:.3f}  {secs / n:.2f} s/completion"
                         for (group, mode), (n, empty, exact, es, secs) in sorted(self.rows.items()))


def run_probe(eng: Engine, picks: list[tuple], out: Path, place: Callable[[tuple], Place],
              modes: dict[str, Callable[[], None]]) -> Tally:
    """Completes each pick (its group first) at `place(pick)` once per mode, after that mode's setup, in this one
    process (modes alternate, so machine load falls on both alike); one JSON line per pick in `out`."""
    tally = Tally()
    with out.open("w") as sink:
        for i, pick in enumerate(picks):
            at = place(pick)
            for mode, setup in modes.items():
                setup()
                t0 = time.perf_counter()
                got = eng.complete(at.text, at.offset, path=str(at.path), memory=False, key=(mode, i)).text
                at.row[mode] = got
                tally.add(pick[0], mode, got, at.row["expected"], time.perf_counter() - t0)
            sink.write(json.dumps(at.row) + "\n")
            sink.flush()
            if (i + 1) % 20 == 0:
                print(f"{i + 1}/{len(picks)}", flush=True)
    eng.close()
    return tally
