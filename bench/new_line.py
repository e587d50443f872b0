"""Writing new code: a line-mode completion on the blank line a user opens after code (Enter, the editor's
indentation), with the file ending there, with and without `text_first` (the decoder may not end the line
before it holds text), in one process (default model, no memory).

Positions are code lines of held-out repositories (never training data), not in the first five of their file;
the document is the file up to that line plus its indentation, and the line is what a completion should write.
Groups: "after code" (the line before is code) and "after blank" (a blank line before it). Reports empty
completions, exact lines and edit similarity per group and mode, and writes one JSON line per completion.

    python bench/new_line.py --repos requests,flask,click --n 50 --out new_line.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "crossfile"))
from metrics import edit_similarity  # noqa: E402

from longllama_lsp import prompt  # noqa: E402
from longllama_lsp.engine import Engine, EngineOptions  # noqa: E402


def positions(path: Path) -> dict[str, list[int]]:
    """0-based code lines (not comments, past the first five) by what comes before them."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out: dict[str, list[int]] = {"after code": [], "after blank": []}
    for ln in range(5, len(lines)):
        text = lines[ln].strip()
        if text and not text.startswith(("#", '"', "'")):
            out["after blank" if not lines[ln - 1].strip() else "after code"].append(ln)
    return out


class _Switch:
    """StopRule with `text_first` forced off while `off` is set (the decoder as it was before)."""

    off = False
    init = prompt.StopRule.__init__

    @classmethod
    def install(cls) -> None:
        def init(rule, *args, **kwargs):
            cls.init(rule, *args, **kwargs)
            rule.text_first = rule.text_first and not cls.off

        prompt.StopRule.__init__ = init


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/work/data/eval"))
    p.add_argument("--repos", default="requests,flask,click")
    p.add_argument("--n", type=int, default=50, help="positions per group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    _Switch.install()
    eng = Engine.load(None, options=EngineOptions(max_tokens=32, memory=False, typeahead=False))
    eng.wait_ready()
    groups: dict[str, list[tuple[Path, int]]] = {"after code": [], "after blank": []}
    for repo in args.repos.split(","):
        for f in sorted((args.data / repo).rglob("*.py")):
            for group, lns in positions(f).items():
                groups[group] += [(f, ln) for ln in lns]
    rng = random.Random(args.seed)
    picks = [(g, *x) for g, xs in groups.items() for x in rng.sample(xs, min(args.n, len(xs)))]
    stats: dict[tuple[str, str], list[float]] = {}
    with args.out.open("w") as sink:
        for i, (group, f, ln) in enumerate(picks):
            lines = f.read_text(encoding="utf-8").split("\n")
            expected = lines[ln].strip()
            indent = lines[ln][: len(lines[ln]) - len(lines[ln].lstrip())]
            text = "\n".join(lines[:ln]) + "\n" + indent
            row = {"group": group, "path": str(f.relative_to(args.data)), "line": ln + 1, "expected": expected}
            for mode in ("text_first", "before"):
                _Switch.off = mode == "before"
                t0 = time.perf_counter()
                got = eng.complete(text, len(text), path=str(f), memory=False, key=(mode, i)).text.strip()
                row[mode] = got
                st = stats.setdefault((group, mode), [0, 0, 0.0, 0, 0.0])
                st[0] += not got
                st[1] += got == expected
                st[2] += edit_similarity(got, expected)
                st[3] += 1
                st[4] += time.perf_counter() - t0
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            if (i + 1) % 20 == 0:
                print(f"{i + 1}/{len(picks)}", flush=True)
    eng.close()
    for (group, mode), (empty, exact, es, n, secs) in sorted(stats.items()):
        print(f"{group:11s} {mode:10s} n={n:4d} empty {empty:4d}  exact {exact:4d}  ES {es / n:.3f}  "
              f"{secs / n:.2f} s/completion")


if __name__ == "__main__":
    main()
