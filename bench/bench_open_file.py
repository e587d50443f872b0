"""The open file with repository memory, in one process (issue 15 targets): the first completion after
opening a file of an indexed repository, and typing a line, with memory against without.

    python bench/bench_open_file.py --repo COPY_OF_EMAIL [--file message.py] [--synthetic 1048576]
                                    [--select-tokens 2048] [--json bench/results/open_file.json]

The engine as the server runs it (default model, its settings' defaults: sparse memory at
`--select-tokens`), the repository indexed beforehand (`longllama index --repo COPY`; this loads the
index, it encodes nothing). First completion: at each of four positions of `--file`, a completion
in a fresh session (no local cache to reuse) without memory, then with memory: the memory one
chunks the buffer, finds its chunks in the index and prefills against the whole repository.
Typing: a line of the file retyped key by key, one completion per key in one session (prefix reuse),
without then with memory, per-key latency p50/p95. `--synthetic N`: the bank is padded to N tokens
with copies of its own chunks (as other files: a 1M-token repository without indexing one).
Every figure is a ratio within this process; the load average is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from longllama_lsp.engine import Engine, EngineOptions  # noqa: E402
from longllama_lsp.shared import DEFER_IDLE_MS  # noqa: E402
from longllama_lsp.workspace import Workspace  # noqa: E402


@dataclass(frozen=True)
class Padding:
    """Meta of a synthetic chunk (what MemoryBank.slot_owner returns)."""

    id: tuple
    path: str
    start_line: int = 1
    end_line: int = 1
    symbol: str | None = None
    content_hash: str = ""
    memory_key: str = ""


def pad_bank(repo, tokens: int) -> int:
    """Copies of the bank's own chunks under other paths until it holds `tokens` live tokens."""
    bank = repo.bank
    with repo.lock:
        originals = list(bank.resident().items())
        i = 0
        while bank.status().live_tokens < tokens:
            cid, _ = originals[i % len(originals)]
            slots = bank.chunk_slots(cid)
            memory = bank.memory().select(__import__("torch").arange(slots.start, slots.stop))
            memory = type(memory)({k: type(c)(c.keys.clone(), c.values.clone(), c.mask.clone())
                                   for k, c in memory.items()})
            meta = Padding(("pad", i), f"synthetic/{i // 64}/{i}.py")
            bank.add(meta.id, memory, meta)
            i += 1
        return bank.status().live_tokens


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def first_completions(engine: Engine, text: str, path: str, positions: list[int]) -> list[dict]:
    rows = []
    for n, offset in enumerate(positions):
        row = {"offset": offset, "load": load()}
        for memory in (False, True):
            t0 = time.perf_counter()
            done = engine.complete(text, offset, path=path, memory=memory, key=("first", n, memory), sources=False)
            row["memory" if memory else "none"] = {"ms": round(1000 * (time.perf_counter() - t0), 1),
                                                   "timings": done.timings}
        rows.append(row)
        print(json.dumps({k: (v["ms"] if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
    return rows


def typing(engine: Engine, text: str, path: str, line_start: int, line_end: int) -> dict:
    """Retype text[line_start:line_end] key by key; ms per completion, without then with memory."""
    out = {}
    for memory in (False, True):
        ms, by_model = [], []  # every key; the keys the model answered (not typeahead)
        for cut in range(line_start + 1, line_end + 1):
            typed = text[:cut] + text[line_end:]
            t0 = time.perf_counter()
            done = engine.complete(typed, cut, path=path, memory=memory, key=("typing", memory), sources=False)
            ms.append(1000 * (time.perf_counter() - t0))
            if "typeahead" not in done.timings:
                by_model.append(ms[-1])
        ms.sort()
        out["memory" if memory else "none"] = {
            "p50": round(statistics.median(ms), 1), "p95": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
            "keys": len(ms), "model_answered": len(by_model),
            "model_p50": round(statistics.median(by_model), 1) if by_model else None, "load": load()}
        print(json.dumps({"typing": out}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--file", default="message.py")
    ap.add_argument("--synthetic", type=int, default=0, help="pad the bank to this many tokens")
    ap.add_argument("--select-tokens", type=int, default=EngineOptions.select_tokens)
    ap.add_argument("--skip-first", action="store_true")
    ap.add_argument("--defer-edits", action="store_true",
                    help="as the language server: edited chunks encoded after a 1 s pause, not in a keystroke")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    engine = Engine.load(options=EngineOptions(select_tokens=args.select_tokens, defer_edits=args.defer_edits,
                                               defer_idle_ms=DEFER_IDLE_MS if args.defer_edits else 0))
    ws = Workspace(engine)
    engine.wait_ready()
    repo = ws.open(args.repo.resolve(), user="bench")
    t0 = time.perf_counter()
    ws.index(repo)  # loads the index: nothing to encode when `longllama index` ran
    result = {"load_s": round(time.perf_counter() - t0, 1), "memory_tokens": repo.bank.status().live_tokens,
              "select_tokens": args.select_tokens, "load_at_start": load()}
    if args.synthetic:
        result["memory_tokens"] = pad_bank(repo, args.synthetic)
    print(json.dumps(result), flush=True)
    path = args.repo.resolve() / args.file
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    starts = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    body = [i for i, x in enumerate(lines) if x.startswith("        ") and len(x.strip()) > 20]
    picks = [body[len(body) * k // 5] for k in (1, 2, 3, 4)]
    if not args.skip_first:
        result["first"] = first_completions(engine, text, str(path), [starts[i] + len(lines[i]) - 1 for i in picks])
    i = picks[1]
    indent = len(lines[i]) - len(lines[i].lstrip())
    result["typing"] = typing(engine, text, str(path), starts[i] + indent, starts[i] + len(lines[i]) - 1)
    result["load_at_end"] = load()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ws.close()


if __name__ == "__main__":
    main()
