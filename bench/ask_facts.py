"""Repository Q&A as users ask it: questions whose answer one file of the repository holds, answered by
`longllama ask`'s engine with no memory, with all of memory (memory.retrieveTokens 0) and with the memory
its question retrieves (memory.retrieveTokens, the default).

    python bench/ask_facts.py [--data /work/data/eval] [--repos requests,flask,click] [--per-kind 10]
                              [--seed 0] [--max-tokens 48] [--systems none,whole,retrieved] [--out F.jsonl]

Questions, from each repository's Python files by `ast` (no model; a name defined once in the repository):
- value: a module-level constant `NAME = literal` (a number or a string, 2-40 printable characters):
  "What is NAME set to?"; right when the literal's text is in the answer (a number as a whole number);
- file: a public top-level function or class (not in an `__init__.py`): "Which file defines NAME?"; right
  when the file's name is in the answer, with or without `.py`, as a whole word;
- params: a public top-level function of 2-4 named parameters: "What parameters does NAME take?"; right
  when every parameter's name is in the answer as a word;
- methods: a public top-level class with 2-8 public methods of its own (a `def` in its body, no leading
  `_`): "Which methods does the NAME class have?"; right when at least half of them, and at least two, are
  in the answer as words;
- module: a Python file (not `__init__.py`) whose name no other file has, defining 2+ public top-level
  functions or classes: "What does the STEM module define?"; right when two of those names are in the
  answer as words.
The repositories are issue 16's held-out ones (never trained on); the model may still know famous ones from
pretraining: the system `none` says how far. One engine, one repository open at a time (its index as
`longllama index` built it), the systems in turn on each question; one JSON line per answer in --out, as
they come (a rerun with the same --out skips the answers already there), then a table.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from facts import cpu_model  # noqa: E402

SYSTEMS = ("none", "whole", "retrieved")
KINDS = ("value", "file", "params", "methods", "module")


Found = dict[str, list[tuple[str, Any]]]  # name -> [(file, what the question asks of it)], one per definition


def definitions(root: Path, files: list[str]) -> tuple[Found, Found, dict[str, list[str]]]:
    """(constant name -> [(file, literal text)], function/class name -> [(file, parameter names)], class
    name -> its public methods) over `files` (`files_of(root)`; a class's parameters: none)."""
    values: Found = defaultdict(list)
    defs: Found = defaultdict(list)
    methods: dict[str, list[str]] = {}
    for rel in files:
        try:
            src = (root / rel).read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                defs[node.name].append((rel, [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]))
            elif isinstance(node, ast.ClassDef):
                defs[node.name].append((rel, []))
                methods[node.name] = [f.name for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                                      and not f.name.startswith("_")]
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                text = literal_text(src, node.value)
                if text is not None:
                    values[node.targets[0].id].append((rel, text))
    return values, defs, methods


def literal_text(src: str, value: ast.expr) -> str | None:
    """What an answer must contain for `NAME = value`: a number as written, a short one-line string's text."""
    if not isinstance(value, ast.Constant) or isinstance(value.value, bool) or value.value is None:
        return None
    text = ast.get_source_segment(src, value) if isinstance(value.value, (int, float)) else value.value
    return text if isinstance(text, str) and 2 <= len(text) <= 40 and text.isprintable() else None


def questions(root: Path, per_kind: int, rng: random.Random) -> list[dict]:
    files = files_of(root)
    values, defs, methods = definitions(root, files)
    once = [(n, v[0]) for n, v in sorted(values.items()) if len(v) == 1 and n not in defs]
    public = [(n, d[0]) for n, d in sorted(defs.items()) if len(d) == 1 and n not in values and not n.startswith("_")]
    where = [(n, f) for n, (f, _) in public if not f.endswith("__init__.py")]
    takes = [(n, f, ps) for n, (f, ps) in public if 2 <= len(ps) <= 4 and ps[0] not in ("self", "cls")]
    out = [{"kind": "value", "name": n, "file": f, "answer": t, "question": f"What is {n} set to?"}
           for n, (f, t) in rng.sample(once, min(per_kind, len(once)))]
    out += [{"kind": "file", "name": n, "file": f, "answer": Path(f).name, "question": f"Which file defines {n}?"}
            for n, f in rng.sample(where, min(per_kind, len(where)))]
    out += [{"kind": "params", "name": n, "file": f, "answer": ps, "question": f"What parameters does {n} take?"}
            for n, f, ps in rng.sample(takes, min(per_kind, len(takes)))]
    has = [(n, f, methods[n]) for n, (f, _) in public if 2 <= len(methods.get(n, ())) <= 8]
    stems = Counter(Path(f).stem for f in files)
    modules = sorted({f: [n for n, (g, _) in public if g == f] for f in files}.items())
    out += [{"kind": "methods", "name": n, "file": f, "answer": ms,
             "question": f"Which methods does the {n} class have?"} for n, f, ms in rng.sample(has, min(per_kind, len(has)))]
    named = [(f, ns) for f, ns in modules if len(ns) >= 2 and stems[Path(f).stem] == 1 and Path(f).stem != "__init__"]
    out += [{"kind": "module", "name": Path(f).stem, "file": f, "answer": ns,
             "question": f"What does the {Path(f).stem} module define?"} for f, ns in rng.sample(named, min(per_kind, len(named)))]
    return out


def files_of(root: Path) -> list[str]:
    """`root`'s Python files, sorted (repository-relative, none under a dot folder)."""
    rels = (p.relative_to(root).as_posix() for p in sorted(root.rglob("*.py")))
    return [r for r in rels if not any(part.startswith(".") for part in Path(r).parts)]


def right(q: dict, answer: str) -> bool:
    if q["kind"] == "params":
        return all(re.search(rf"(?<!\w){re.escape(p)}(?!\w)", answer) for p in q["answer"])
    if q["kind"] in ("methods", "module"):
        named = sum(re.search(rf"(?<!\w){re.escape(m)}(?!\w)", answer) is not None for m in set(q["answer"]))
        return named >= (2 if q["kind"] == "module" else max(2, (len(q["answer"]) + 1) // 2))
    if q["kind"] == "file":
        stem = re.escape(Path(q["answer"]).stem)
        return re.search(rf"(?<![\w.]){stem}(\.py)?(?!\w)", answer) is not None
    want = q["answer"]
    if re.fullmatch(r"[\d._eExXa-fA-F+-]+", want):  # a number: not inside a longer one
        return re.search(rf"(?<![\w.]){re.escape(want)}(?![\w]|\.\d)", answer) is not None
    return want in answer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/work/data/eval"))
    p.add_argument("--repos", default="requests,flask,click")
    p.add_argument("--per-kind", type=int, default=10, help="questions of each kind per repository")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--kinds", default=",".join(KINDS), help="question kinds to ask (default: all)")
    p.add_argument("--model", help="checkpoint or delta (default: the bundled default model)")
    p.add_argument("--out", type=Path, default=Path("ask-facts.jsonl"))
    p.add_argument("--knn-weight", type=float, help="memory.knnWeight (default: the engine's)")
    args = p.parse_args(argv)
    systems, kinds = args.systems.split(","), args.kinds.split(",")
    if unknown := set(systems) - set(SYSTEMS):
        p.error(f"unknown systems: {sorted(unknown)}")
    if unknown := set(kinds) - set(KINDS):
        p.error(f"unknown kinds: {sorted(unknown)}")
    done = {(r["repo"], r["kind"], r["name"], r["system"]) for r in map(json.loads, args.out.open())} \
        if args.out.exists() else set()

    from longllama_lsp.engine import Engine, EngineOptions
    from longllama_lsp.workspace import Workspace

    engine = Engine.load(args.model, options=EngineOptions(answer_max_tokens=args.max_tokens))
    retrieve = engine.options.retrieve_tokens
    if args.knn_weight is not None:
        engine.options.knn_weight = args.knn_weight
    workspace = Workspace(engine)
    try:
        engine.wait_ready()
        with args.out.open("a") as sink:
            for name in args.repos.split(","):
                root = args.data / name
                qs = [q for q in questions(root, args.per_kind, random.Random(f"{args.seed}:{name}"))
                      if q["kind"] in kinds]
                repo = workspace.open(root, user=name)
                workspace.index(repo)
                for q in qs:
                    for system in systems:
                        if (name, q["kind"], q["name"], system) in done:
                            continue
                        engine.options.retrieve_tokens = 0 if system == "whole" else retrieve
                        t0 = time.perf_counter()
                        a = engine.answer(q["question"], memory=system != "none")
                        rec = {**q, "repo": name, "system": system, "text": a.text, "right": right(q, a.text),
                               "sources": [s.path for s in a.sources], "memory_tokens": a.memory_tokens,
                               "knn_tokens": a.timings.get("knnTokens", 0),
                               "seconds": round(time.perf_counter() - t0, 2), "load": os.getloadavg()[0]}
                        sink.write(json.dumps(rec) + "\n")
                        sink.flush()
                        print(f"{name:9} {system:9} {q['kind']:5} {rec['right']!s:5} {q['name']}: {a.text[:70]!r}",
                              flush=True)
                workspace.release(name)
    finally:
        workspace.close()
    print(table([json.loads(x) for x in args.out.open()], systems))
    print(f"cpu: {cpu_model()}, threads {os.environ.get('OMP_NUM_THREADS')}, load {os.getloadavg()}")
    return 0


def table(records: list[dict], systems: list[str]) -> str:
    """Right answers per system and kind, how often the sources listed (`Answer.sources`, most attended
    first) hold the file the answer is in, and where the retrieved system differs from the whole memory."""
    rows = ["| system | " + " | ".join(KINDS) + " | all | defining file: a source / the first |",
            "|---" * (len(KINDS) + 3) + "|"]
    for s in systems:
        got = [r for r in records if r["system"] == s]
        cell = {k: f"{sum(r['right'] for r in got if r['kind'] == k)}/{sum(r['kind'] == k for r in got)}"
                for k in KINDS}
        cited = f"{sum(r['file'] in r['sources'] for r in got)} / {sum(r['sources'][:1] == [r['file']] for r in got)}"
        rows.append(f"| {s} | " + " | ".join(cell[k] for k in KINDS) + f" | {sum(r['right'] for r in got)}/{len(got)} | "
                    f"{cited if s != 'none' else '-'} |")
    by = {(r["repo"], r["kind"], r["name"], r["system"]): r["right"] for r in records}
    pairs = [(by[k[:3] + ("whole",)], v) for k, v in by.items() if k[3] == "retrieved" and k[:3] + ("whole",) in by]
    rows.append(f"\nretrieved against whole, same questions: {sum(b and not a for a, b in pairs)} gained, "
                f"{sum(a and not b for a, b in pairs)} lost of {len(pairs)}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
