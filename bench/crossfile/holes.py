"""Cross-file completion holes (issue 8), CrossCodeEval-style, from source text only.

A *cross-file* hole is a line of file F whose remainder (from the hole column to the end of the line)
references an identifier that is defined in another file G of the same repository and nowhere in F
(F may import it: an import is not a definition). Definitions and references come from Python's
`ast` on the source text; the repository code is never imported or executed. An *ordinary* hole is a
code line with no such identifier (about a quarter of the set).

    python bench/crossfile/holes.py --data /work/data/eval --repos requests flask click \
        --cross 15 --ordinary 5 --seed 8 --out bench/crossfile/holes.jsonl
    (the same with --seed 9 and --seed 14: holes-seed9.jsonl and holes-seed14.jsonl, two more sets of 60;
    run.py --holes reads them; holes-seed21.jsonl: --cross 30 --ordinary 10 --seed 21, less the 25 holes
    that are in any earlier set: 95 holes no decision has seen; holes-seed28.jsonl: --cross 30 --ordinary 10
    --seed 28, less every hole of the four earlier sets: 104 holes, stop 38's check of its decisions;
    holes-seed35.jsonl: the same with --seed 35, less every hole of the five earlier sets: 95 holes, stop 39's;
    holes-seed42.jsonl: --seed 42, less every hole of the six earlier sets: 95 holes, kept back at stop 41;
    typed holes: holes-typed2*.jsonl (--typed 2), holes-typed1.jsonl (--typed 1), holes-typed-name.jsonl)
    Four more repositories (stop 45; the wheels of starlette 0.41.3, marshmallow 3.23.1, itsdangerous 2.2.0 and
    werkzeug 3.1.3, unpacked in /work/data/eval beside the others; training reads installed packages, and the
    project installs none of these):
    holes-new-seed200.jsonl: --repos starlette marshmallow itsdangerous werkzeug --cross 30 --ordinary 10
    --seed 200 (140 holes; ids tagged n200); holes-new-seed300.jsonl: the same with --seed 300, less the seed
    200 set's holes (122, tagged n300, held back at stop 45); holes-typed2-new-seed{200,300}.jsonl: --typed 2.
    holes-new2-seed400.jsonl (stop 48): --repos h11 attrs packaging httpx --cross 30 --ordinary 10 --seed 400
    (160 holes, ids tagged n400; the wheels of h11 0.14.0, attrs 24.2.0, packaging 24.2, httpx 0.27.2, unpacked as above;
    of these only httpx is outside the venv whose site-packages training read). holes-new3-seed500.jsonl (stop 48,
    held back): --repos markdown sqlparse structlog wtforms --cross 30 --ordinary 10 --seed 500 (160, tagged n500;
    Markdown 3.7, sqlparse 0.5.2, structlog 24.4.0, WTForms 3.2.1, none installed here); typed: holes-typed2-new3-seed500.jsonl.
    holes-new4-seed600.jsonl (stop 49, held back): --repos tenacity mistune jmespath h2 --cross 30 --ordinary 10
    --seed 600 (155; ids tagged n600 by hand after the run; tenacity 9.2.1, mistune 3.4.0, jmespath 1.1.0, h2
    4.4.1, none installed here); typed: holes-typed2-new4-seed600.jsonl (52, tagged n600-typed).

Each output line: {"id", "repo", "path" (relative to the repo root), "line" (0-based), "col" (code
points), "expected" (the line's text from col, trailing whitespace dropped), "kind" ("crossfile" or
"ordinary"), "xfile" ([{"name", "defined_in": [paths]}]), "anchor" ("indent" or "identifier")}. With `--typed CHARS
--from SETS`: their cross-file holes whose line starts with the name, the anchor "typed" and "typed": CHARS
(the characters of "expected" already before the cursor). holes-typed2.jsonl: `--typed 2 --from` the seed 9, 14,
21 and 28 sets (117 holes); holes-typed2-first.jsonl from holes.jsonl (21), holes-typed2-seed35.jsonl from
holes-seed35.jsonl (30): stop 40's measure of completions as editors ask, mid-word. holes-typed-name.jsonl:
`--typed name --from` the same four sets: the same 117 holes with the whole name typed.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import io
import json
import keyword
import random
import sys
import tokenize
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Names that read like cross-file references but usually mean a builtin type's method (dict.get ...).
COMMON_ATTRS = frozenset(n for t in (dict, list, str, bytes, set, tuple, int, object, BaseException,
                                    io.TextIOWrapper, io.BufferedWriter, io.BytesIO, io.StringIO)
                         for n in dir(t)) | frozenset(dir(builtins))
MIN_NAME = 4
MAX_PER_FILE = 4
MIN_EXPECTED, MAX_EXPECTED = 4, 120


@dataclass
class Hole:
    id: str
    repo: str
    path: str
    line: int  # 0-based
    col: int  # code points into the line
    expected: str
    kind: str  # "crossfile" | "ordinary"
    anchor: str  # "indent" | "identifier"
    xfile: list[dict] = field(default_factory=list)


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if ".longllama" not in p.parts and "__pycache__" not in p.parts)


def definitions(tree: ast.Module) -> set[str]:
    """Names a file defines for other files: module-level and class-level functions, classes and
    assignments (recursing into if/try/with blocks at those levels)."""
    out: set[str] = set()

    def scan(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(node.name)
            elif isinstance(node, ast.ClassDef):
                out.add(node.name)
                scan(node.body)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    out.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for part in ("body", "orelse", "finalbody"):
                    scan(getattr(node, part, []) or [])
                for h in getattr(node, "handlers", []) or []:
                    scan(h.body)
    scan(tree.body)
    return out


def bound_names(tree: ast.Module) -> set[str]:
    """Every name a file binds itself, in any scope (imports excluded): definitions, parameters,
    assignment/loop/with/except targets, and attributes it assigns (self.x = ...)."""
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
    return out


def foreign_imports(tree: ast.Module, package: str) -> set[str]:
    """Names bound by imports of modules outside the repository (`import typing as t`, `from os
    import path`): `t.Tuple` is typing's Tuple, not the repository's."""
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.name.split(".")[0] != package:
                    out.add(a.asname or a.name.split(".")[0])
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").split(".")[0] != package:
            out.update(a.asname or a.name for a in n.names)
    return out | set(sys.stdlib_module_names)


def _char_col(line: str, byte_col: int) -> int:
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def references(tree: ast.Module, lines: list[str], foreign: frozenset[str] | set[str] = frozenset()
               ) -> dict[int, list[tuple[int, str]]]:
    """0-based line -> [(code-point column, name)] of loaded names and attribute names on that line
    (attributes of a `foreign` name, such as a stdlib module, are left out)."""
    out: dict[int, list[tuple[int, str]]] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            ln = n.lineno - 1
            out.setdefault(ln, []).append((_char_col(lines[ln], n.col_offset), n.id))
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and n.end_lineno is not None:
            if isinstance(n.value, ast.Name) and n.value.id in foreign:
                continue
            ln = n.end_lineno - 1
            end = _char_col(lines[ln], n.end_col_offset)
            start = end - len(n.attr)
            if start >= 0 and lines[ln][start:end] == n.attr:
                out.setdefault(ln, []).append((start, n.attr))
    return {k: sorted(set(v)) for k, v in out.items()}


def excluded_lines(source: str, tree: ast.Module) -> set[int]:
    """0-based lines that are not completable code: inside/starting strings (docstrings), comments,
    blank lines, imports."""
    out: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.start[0] != tok.end[0]:
            out.update(range(tok.start[0] - 1, tok.end[0]))
    for n in ast.walk(tree):
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            out.update(range(n.lineno - 1, (n.end_lineno or n.lineno)))
        elif isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str):
            out.update(range(n.lineno - 1, (n.end_lineno or n.lineno)))
    for i, line in enumerate(source.splitlines()):
        s = line.strip()
        if not s or s.startswith("#") or s[0] in "\"'" or s in (")", "]", "}", "):", "],", "},", "),"):
            out.add(i)
    return out


def _candidate(name: str, defined_elsewhere: dict[str, list[str]], own: set[str]) -> bool:
    return (name in defined_elsewhere and name not in own and len(name) >= MIN_NAME
            and not name.startswith("__") and name not in COMMON_ATTRS and not keyword.iskeyword(name))


def repo_package(root: Path) -> str:
    """The repository's top-level package (the folder holding __init__.py), else the root's name."""
    pkgs = sorted(p.parent.name for p in root.glob("*/__init__.py"))
    return pkgs[0] if pkgs else root.name


def repo_holes(repo: str, root: Path) -> tuple[list[Hole], list[Hole]]:
    """All candidate (crossfile, ordinary) holes of one repository, in file/line order."""
    files = python_files(root)
    parsed: dict[str, tuple[str, ast.Module]] = {}
    for p in files:
        src = p.read_text(encoding="utf-8")
        parsed[p.relative_to(root).as_posix()] = (src, ast.parse(src))
    defs = {rel: definitions(tree) for rel, (_, tree) in parsed.items()}
    package = repo_package(root)
    cross: list[Hole] = []
    ordinary: list[Hole] = []
    for rel, (src, tree) in parsed.items():
        lines = src.splitlines()
        foreign = foreign_imports(tree, package)
        own = bound_names(tree) | defs[rel] | foreign
        elsewhere: dict[str, list[str]] = {}
        for other, names in defs.items():
            if other != rel:
                for nm in names:
                    elsewhere.setdefault(nm, []).append(other)
        refs = references(tree, lines, foreign)
        skip = excluded_lines(src, tree)
        for ln, line in enumerate(lines):
            if ln in skip or ln < 5:
                continue
            indent = len(line) - len(line.lstrip())
            xs = [(c, nm) for c, nm in refs.get(ln, []) if c >= indent and _candidate(nm, elsewhere, own)]
            if xs:
                for anchor, col in (("indent", indent), ("identifier", xs[0][0])):
                    if anchor == "identifier" and col == indent:
                        continue
                    exp = line[col:].rstrip()
                    names = sorted({nm for c, nm in xs if c >= col})
                    if names and MIN_EXPECTED <= len(exp.strip()) <= MAX_EXPECTED:
                        cross.append(Hole("", repo, rel, ln, col, exp, "crossfile", anchor,
                                          [{"name": nm, "defined_in": sorted(elsewhere[nm])} for nm in names]))
            else:
                exp = line[indent:].rstrip()
                if MIN_EXPECTED <= len(exp) <= MAX_EXPECTED:
                    ordinary.append(Hole("", repo, rel, ln, indent, exp, "ordinary", "indent"))
    return cross, ordinary


def _sample(cands: list[Hole], k: int, rng: random.Random, per_file: dict[str, int]) -> list[Hole]:
    """k holes, at most one per line and MAX_PER_FILE per file (counting earlier picks)."""
    pool = cands[:]
    rng.shuffle(pool)
    out, lines = [], set()
    for h in pool:
        if len(out) == k:
            break
        if (h.path, h.line) in lines or per_file.get(h.path, 0) >= MAX_PER_FILE:
            continue
        lines.add((h.path, h.line))
        per_file[h.path] = per_file.get(h.path, 0) + 1
        out.append(h)
    return out


def select(repo: str, root: Path, n_cross: int, n_ordinary: int, seed: int) -> list[Hole]:
    cross, ordinary = repo_holes(repo, root)
    rng = random.Random(f"{seed}:{repo}")
    per_file: dict[str, int] = {}
    picked = _sample(cross, n_cross, rng, per_file)
    taken = {(h.path, h.line) for h in picked}
    picked += _sample([h for h in ordinary if (h.path, h.line) not in taken], n_ordinary, rng, per_file)
    picked.sort(key=lambda h: (h.path, h.line))
    for i, h in enumerate(picked):
        h.id = f"{repo}-{i:03d}"
    return picked


def typed_holes(holes: list[dict], chars: int | None) -> list[dict]:
    """The cross-file holes whose line starts with the cross-file name, with its first `chars` characters
    typed (None: all of it; `"typed"`: how many; run.py puts the cursor after them and scores them with
    the completion): how an editor asks, mid-word, once the user has begun the name. A place that several
    sets hold is taken once, and ids are numbered anew per repository (ids repeat across sets)."""
    out, seen = [], set()
    for h in holes:
        name = next((x["name"] for x in h["xfile"] if h["expected"].startswith(x["name"])
                     and (chars is None or len(x["name"]) > chars)), None)
        place = (h["repo"], h["path"], h["line"], h["col"])
        if h["kind"] == "crossfile" and place not in seen and name is not None:
            seen.add(place)
            n = sum(o["repo"] == h["repo"] for o in out)
            out.append({**h, "id": f"{h['repo']}-typed-{n:03d}", "anchor": "typed",
                        "typed": len(name) if chars is None else chars})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/work/data/eval"), help="folder holding one folder per repository")
    p.add_argument("--repos", nargs="+", default=["requests", "flask", "click"])
    p.add_argument("--cross", type=int, default=15, help="cross-file holes per repository")
    p.add_argument("--ordinary", type=int, default=5, help="ordinary holes per repository")
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("holes.jsonl"))
    p.add_argument("--typed", metavar="CHARS|name",
                   help="instead: of the --from sets' cross-file holes that start with the name, the same holes "
                        "with its first CHARS characters typed ('name': all of it)")
    p.add_argument("--from", dest="sources", nargs="+", type=Path, default=[], help="hole sets for --typed")
    a = p.parse_args(argv)
    if a.typed is not None:
        holes = [h for f in a.sources for h in map(json.loads, f.read_text(encoding="utf-8").splitlines())]
        typed = typed_holes(holes, None if a.typed == "name" else int(a.typed))
        a.out.write_text("".join(json.dumps(h) + "\n" for h in typed), encoding="utf-8")
        print(f"{len(typed)} typed holes of {len(holes)} -> {a.out}")
        return 0
    holes = [h for r in a.repos for h in select(r, a.data / r, a.cross, a.ordinary, a.seed)]
    a.out.write_text("".join(json.dumps(asdict(h)) + "\n" for h in holes), encoding="utf-8")
    n_x = sum(h.kind == "crossfile" for h in holes)
    print(f"{len(holes)} holes ({n_x} cross-file, {len(holes) - n_x} ordinary) -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
