"""Token healing after punctuation: complete the rest of code lines from a cursor right after an opening
bracket or a dot (`open(|"r")`, `d[|"key"]`, `f(|)`, `self.|__dict__`, `x.|get(...)`), with and without
redoing the punctuation's token, in one process (default model, no memory, line mode).

Positions are sampled from held-out repositories (never training data). Each falls in one of two groups:
"merge", where SmolLM2's BPE writes the punctuation and what follows it as one token (`("`, `()`, `.__`): the
prompt then ends on a split the model never saw; and "boundary" (`(` then `self`), where healing should change
nothing. Reports exact rest-of-line and edit similarity per group and mode, and writes one JSON line per
completion.

    python bench/punct_heal.py --repos requests,flask,click --n 160 --out punct.jsonl
"""

from __future__ import annotations

import io
import re
import sys
import tokenize
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "crossfile"))
from probe import Place, probe_arguments, probe_engine, run_probe, sample  # noqa: E402

OPENERS = ("(", "[", "{", ".")


def positions(path: Path) -> list[tuple[int, int]]:
    """(0-based line, column) right after each opening bracket or dot outside strings and comments, with
    code after it on the same line."""
    src = path.read_text(encoding="utf-8")
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.OP and tok.string in OPENERS:
                line, col = tok.end[0] - 1, tok.end[1]
                if tok.line[col:].strip():
                    out.append((line, col))
    except (tokenize.TokenError, SyntaxError):
        return []
    return out


def merges(tokenizer, line: str, col: int) -> bool:
    """Whether BPE writes the character before `col` and the one after it in one token."""
    ids = tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return not any(start == col for start, _ in ids)


def main() -> None:
    args = probe_arguments(__doc__, 160, "positions per group (merge, boundary)")
    eng = probe_engine()
    tok = eng.tokenizer
    groups: dict[str, list[tuple[Path, int, int]]] = {"merge": [], "boundary": []}
    for repo in args.repos.split(","):
        for f in sorted((args.data / repo).rglob("*.py")):
            lines = f.read_text(encoding="utf-8").split("\n")
            for ln, col in positions(f):
                groups["merge" if merges(tok, lines[ln], col) else "boundary"].append((f, ln, col))
    picks = sample(groups, args.n, args.seed)
    healing = eng._heal
    # the healing before this change: a cursor after punctuation kept the prompt as it was
    before = lambda ids, prefix: (ids, "") if re.search(r"[^\w\s]$", prefix) else healing(ids, prefix)  # noqa: E731
    def place(pick: tuple[str, Path, int, int]) -> Place:
        group, f, ln, col = pick
        lines = f.read_text(encoding="utf-8").split("\n")
        text = "\n".join(lines[:ln] + [lines[ln][:col]] + lines[ln + 1:])
        offset = len("\n".join(lines[:ln])) + (1 if ln else 0) + col
        row = {"group": group, "path": str(f.relative_to(args.data)), "line": ln + 1, "col": col,
               "expected": lines[ln][col:].rstrip()}
        return Place(f, text, offset, row)

    modes = {"healed": lambda: setattr(eng, "_heal", healing), "plain": lambda: setattr(eng, "_heal", before)}
    tally = run_probe(eng, picks, args.out, place, modes)
    print(tally.report())


if __name__ == "__main__":
    main()
