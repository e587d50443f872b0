"""The first completion's memory assembly after indexing, without and with the retrieval warm-up.

    python bench/retrieval_warmup.py REPO FILE [--repeats 2] [--json OUT]

A Workspace + Engine (the bundled model) over REPO's index (built on first use, cached as the server
caches it); FILE (relative to REPO) is completed at the line after its middle. Without the warm-up:
retrieval is off while indexing (Engine.warm_retrieval does nothing) and on for the completion, which
then reads every chunk's text itself; with it: on throughout, the warm-up jobs run before the
completion. Alternates the two, one process (A/B on one machine state); prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longllama_lsp.engine import Engine, EngineOptions
from longllama_lsp.workspace import Workspace

RETRIEVE = 4096


def first_completion(root: Path, rel: str, warm: bool) -> dict:
    text = (root / rel).read_text()
    cut = text.index("\n", len(text) // 2) + 1
    engine = Engine.load(None, "cpu", options=EngineOptions(max_tokens=1, retrieve_tokens=RETRIEVE if warm else 0))
    engine.wait_ready()
    ws = Workspace(engine)
    try:
        repo = ws.open(root, user="bench")
        ws.index(repo)
        engine.on_worker(lambda: None)  # behind the warm-up jobs, if any were queued
        engine.options.retrieve_tokens = RETRIEVE
        t = time.perf_counter()
        done = engine.complete(text[:cut], cut, path=str(root / rel))
        return {"memory_ms": done.timings["memory"], "total_ms": round((time.perf_counter() - t) * 1000),
                "chunks": len(repo.bank.resident())}
    finally:
        ws.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("repo", type=Path)
    p.add_argument("file", help="a file of REPO to complete in")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    out: dict = {"repo": str(args.repo), "file": args.file, "cold": [], "warm": []}
    for _ in range(args.repeats):
        for warm in (False, True):
            out["warm" if warm else "cold"].append(first_completion(args.repo.resolve(), args.file, warm))
    out["load"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
