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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "crossfile"))
from probe import Place, probe_arguments, probe_engine, run_probe, sample  # noqa: E402

from longllama_lsp import prompt  # noqa: E402


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
    args = probe_arguments(__doc__, 50, "positions per group")
    _Switch.install()
    eng = probe_engine()
    groups: dict[str, list[tuple[Path, int]]] = {"after code": [], "after blank": []}
    for repo in args.repos.split(","):
        for f in sorted((args.data / repo).rglob("*.py")):
            for group, lns in positions(f).items():
                groups[group] += [(f, ln) for ln in lns]
    picks = sample(groups, args.n, args.seed)

    def place(pick: tuple[str, Path, int]) -> Place:
        group, f, ln = pick
        lines = f.read_text(encoding="utf-8").split("\n")
        indent = lines[ln][: len(lines[ln]) - len(lines[ln].lstrip())]
        text = "\n".join(lines[:ln]) + "\n" + indent
        row = {"group": group, "path": str(f.relative_to(args.data)), "line": ln + 1, "expected": lines[ln].strip()}
        return Place(f, text, len(text), row)

    modes = {"text_first": lambda: setattr(_Switch, "off", False), "before": lambda: setattr(_Switch, "off", True)}
    tally = run_probe(eng, picks, args.out, place, modes)
    print(tally.report())


if __name__ == "__main__":
    main()
