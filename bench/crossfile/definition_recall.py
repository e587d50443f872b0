"""How often a completion's retrieved memory holds the definition of the hole's cross-file name.

    python bench/crossfile/definition_recall.py [--holes H ...] [--data /work/data/eval] [--json OUT]

For every cross-file hole of the hole sets: the chunks of other files that `memory.retrieveTokens` (4,096)
retrieves for the text before the cursor, ranked as `Assembler._retrieve` ranks them
(`longllama_lsp.lexical.ChunkRetriever`, the index's chunks, symbols and token counts), with and without
the definitions-first share (`wanted_definitions`). A name counts as held when a retrieved chunk of a file
the hole names as defining it has a definition line for it (`def`/`class`/assignment/import), and as
present when any retrieved chunk has the name. Reads each repository's index (built by `longllama
index --repo ...` with --model, the bundled default by default) and the files; no model runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sqlite3
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

from indexer.pipeline import checkpoint_fingerprint  # noqa: E402
from indexer.store import index_path  # noqa: E402
from longllama_lsp.lexical import Candidate, ChunkRetriever, Query, defined_by  # noqa: E402
from longllama_lsp.resolve import resolve_model  # noqa: E402

SETS = ["holes-seed9.jsonl", "holes-seed14.jsonl", "holes-seed21.jsonl", "holes.jsonl"]
BUDGET = 4096  # memory.retrieveTokens' default


def index_chunks(root: Path, model_dir: Path) -> list[dict]:
    """Every chunk of root's index for the model in `model_dir`, with its text read from the file."""
    db = index_path(root, checkpoint_fingerprint(model_dir))
    if not db.exists():
        raise SystemExit(f"{db}: no index; run `longllama index --repo {root}` first")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    files: dict[str, bytes] = {}
    out = []
    for cid, path, sb, eb, symbol, tokens, content_hash in conn.execute(
            "SELECT id, path, start_byte, end_byte, symbol, token_count, content_hash FROM chunks"):
        data = files.setdefault(path, (root / path).read_bytes())
        out.append({"id": cid, "path": path, "text": data[sb:eb].decode("utf-8", "replace"), "symbol": symbol,
                    "tokens": tokens, "hash": content_hash})
    conn.close()
    return out


def defines(text: str, name: str) -> bool:
    n = re.escape(name)
    return bool(re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{n}\b|^\s*{n}\s*(?::[^=\n]*)?=(?!=)|\bimport\b.*\b{n}\b",
                          text, re.M))


def recall(holes: list[dict], data: Path, model_dir: Path, definitions_first: bool) -> dict[str, int]:
    repos: dict[str, tuple[list[dict], ChunkRetriever]] = {}
    out = {"holes": 0, "names": 0, "present": 0, "defined": 0}
    for h in holes:
        if h["repo"] not in repos:  # setdefault would read the index and every file again for each hole
            repos[h["repo"]] = (index_chunks(data / h["repo"], model_dir), ChunkRetriever())
        chunks, retriever = repos[h["repo"]]
        lines = (data / h["repo"] / h["path"]).read_text().split("\n")
        before = "\n".join(lines[:h["line"]] + [lines[h["line"]][:h["col"]]])
        candidates = [Candidate(c["id"], c["hash"], c["tokens"], lambda c=c: c["text"], defined_by(c["symbol"]))
                      for c in chunks if c["path"] != h["path"]]
        query = Query.before_cursor(before)
        if not definitions_first:
            query = dataclasses.replace(query, definitions=frozenset())
        chosen = retriever.top(candidates, query, BUDGET)
        got = [c for c in chunks if c["id"] in chosen]
        out["holes"] += 1
        for x in h["xfile"]:
            out["names"] += 1
            out["present"] += any(re.search(rf"\b{re.escape(x['name'])}\b", c["text"]) for c in got)
            out["defined"] += any(c["path"] in x["defined_in"] and defines(c["text"], x["name"]) for c in got)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--holes", nargs="*", type=Path, default=[HERE / s for s in SETS])
    p.add_argument("--data", type=Path, default=Path("/work/data/eval"))
    p.add_argument("--json", type=Path)
    p.add_argument("--model", default=None, help="whose index to read (default: the bundled default model)")
    a = p.parse_args()
    model_dir = Path(resolve_model(a.model))
    result = {}
    for path in a.holes:
        holes = [h for h in map(json.loads, path.read_text().splitlines()) if h["kind"] == "crossfile"]
        result[path.name] = {"bm25": recall(holes, a.data, model_dir, False),
                             "definitions first": recall(holes, a.data, model_dir, True)}
        for k, v in result[path.name].items():
            print(f"{path.name:22} {k:18} definition held {v['defined']:3}/{v['names']}, name present "
                  f"{v['present']:3}/{v['names']}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
