"""Speed of the whole loop on one real repository (issue 8), through the language server:

    nice -n 10 python bench/crossfile/loop.py --repo requests --completions 10 --json /tmp/loop.json

1. initial index: a fresh copy of the repository (no .longllama), server start -> indexing "watching"
   (model load included; the status's files/chunks/memory tokens recorded);
2. save -> updated memory: append a small function to a file, poll longllama/status until the
   indexer's stored token count changes (its watcher re-encodes the file), `--saves` times;
3. completion latency p50/p95 at `--completions` holes of holes.jsonl (memory on, system (c)), and
   the same holes with baseline (b) (memory off, BM25 snippets) on a second server;
4. `longllama/ask` time to first token = queue + memory + prefill of the answer's timings (the first
   token comes out of the prefill), and its wall time;
5. peak RSS (VmHWM) of each server process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Prompter, Server, machine_facts, percentile, split_at_hole, utf16_len  # noqa: E402


def holes_for(path: Path, repo: str, n: int) -> list[dict]:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r["repo"] == repo]
    n = min(n, len(rows))
    return [rows[(j * len(rows)) // n] for j in range(n)]


def completions(server: Server, root: Path, holes: list[dict], tag: str, prompter: Prompter | None) -> list[float]:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if ".longllama" not in p.parts)
    out = []
    for h in holes:
        before, after = split_at_hole((root / h["path"]).read_text(encoding="utf-8"), h)
        if prompter is not None:
            header, prefix, _ = prompter.retrieval(h["repo"], root, files, h, before)
            before = header + prefix
        uri = (root / h["path"]).as_uri() + f"?hole={h['id']}&loop={tag}"
        _, ms, _ = server.complete(uri, before + after, before.count("\n"),
                                   utf16_len(before[before.rfind("\n") + 1:]))
        out.append(ms)
        print(f"[{tag}] {h['id']} {ms:.0f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Index / save / complete / ask timings on one repository.")
    p.add_argument("--repo", default="requests")
    p.add_argument("--data", type=Path, default=Path("/work/data/eval"))
    p.add_argument("--work", type=Path, default=Path("/tmp/longllama-loop"))
    p.add_argument("--holes", type=Path, default=Path(__file__).with_name("holes.jsonl"))
    p.add_argument("--completions", type=int, default=10)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--context-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    root = a.work / a.repo
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(a.data / a.repo, root)
    a.work.mkdir(parents=True, exist_ok=True)
    out: dict = {"repo": a.repo, "machine": machine_facts(a.threads), "context_tokens": a.context_tokens}
    holes = holes_for(a.holes, a.repo, a.completions)

    srv = Server(root, True, True, a.model, a.work / "server-loop-c.log", a.threads, a.context_tokens)
    try:
        st = srv.status
        out["initial_index"] = {"seconds_start_to_watching": srv.index_seconds, "files": st["files"],
                                "chunks": st["chunks"], "memory_tokens": st["memoryTokens"]}
        print(f"indexed in {srv.index_seconds} s: {st['files']} files, {st['memoryTokens']} memory tokens", flush=True)
        target = sorted(root.rglob("*.py"))[0]
        saves = []
        for i in range(a.saves):
            before = srv.client.status()["details"][0]["tokens"]
            with target.open("a", encoding="utf-8") as f:
                f.write(f"\n\ndef loop_probe_{i}(value):\n    return value * {i + 2} + len(str(value))\n")
            t0 = time.perf_counter()
            while srv.client.status()["details"][0]["tokens"] == before:
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError("the saved file never reached memory")
                time.sleep(0.05)
            saves.append(round(time.perf_counter() - t0, 2))
            print(f"save {i}: memory updated after {saves[-1]} s", flush=True)
        out["save_to_memory_s"] = saves
        lat_c = completions(srv, root, holes, "c", None)
        t0 = time.perf_counter()
        ask = srv.client.request("longllama/ask", {"question": "Which function sends a prepared request?",
                                                   "maxTokens": 32}, timeout=1800)["result"]
        wall = (time.perf_counter() - t0) * 1000
        tm = ask["timings"]
        out["ask"] = {"time_to_first_token_ms": round(tm.get("queue", 0) + tm.get("memory", 0) + tm.get("prefill", 0)),
                      "wall_ms": round(wall), "timings": tm}
        out["peak_rss_kib_c"] = srv.peak_rss_kib()
    finally:
        srv.close()
    base = Server(root, False, False, a.model, a.work / "server-loop-b.log", a.threads, a.context_tokens)
    try:
        from longllama_lsp.model.loading import load_tokenizer
        from longllama_lsp.resolve import resolve_model
        prompter = Prompter(load_tokenizer(resolve_model(explicit=a.model)), base.context_tokens, "bm25", 0.5)
        lat_b = completions(base, root, holes, "b", prompter)
        out["peak_rss_kib_b"] = base.peak_rss_kib()
    finally:
        base.close()
    for tag, lat in (("c", lat_c), ("b", lat_b)):
        out[f"completion_{tag}"] = {"n": len(lat), "p50_ms": round(percentile(lat, 50)), "p95_ms": round(percentile(lat, 95))}
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
