"""One completion through `longllama serve --http` (http_api.py) vs the engine called directly.

    python bench/bench_http.py [--model PATH] [--repo DIR] [--rounds 10] [--max-tokens 16]

One process, one engine: the API server runs on a thread over the same Workspace, and the two ways
alternate for --rounds rounds, so machine noise hits both. Each request gets a fresh prefix-reuse
session on both sides (the HTTP API keys requests per call without `user`; the direct calls get a
new key each), so both prefill the whole prompt. Reports the median and the spread of wall time per
completion as the client sees it, and the load average before and after.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
from pathlib import Path

from longllama_lsp.engine import Engine, EngineOptions
from longllama_lsp.http_api import Api, ApiServer
from longllama_lsp.workspace import Workspace, open_indexer

FILE = Path(__file__).resolve().parents[1] / "longllama_lsp" / "worker.py"
TOKEN = "bench-token"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--repo", default=None, help="index this repository first (default: no repository memory)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()

    engine = Engine.load(args.model, options=EngineOptions(max_tokens=args.max_tokens, mode="block"))
    workspace = Workspace(engine, None if args.repo is None else open_indexer)
    engine.wait_ready()
    if args.repo:
        workspace.index(workspace.open(Path(args.repo), "bench"))
    server = ApiServer(("127.0.0.1", 0), Api(workspace, TOKEN, "bench"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    text = FILE.read_text()
    offset = text.index("        req = Request(fn, key, priority)") + len("        req = ")
    prefix, suffix = text[:offset], text[offset:]
    body = json.dumps({"prompt": prefix, "suffix": suffix, "max_tokens": args.max_tokens}).encode()
    conn = http.client.HTTPConnection(*server.server_address)

    def over_http() -> str:
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())["choices"][0]["text"]

    def direct(i: int) -> str:
        return engine.complete(text, offset, max_tokens=args.max_tokens, key=("bench", i)).text

    load_before = os.getloadavg()
    direct(-1), over_http()  # warm up
    times: dict[str, list[float]] = {"http": [], "engine": []}
    outputs = set()
    for i in range(args.rounds):
        for way in ("http", "engine") if i % 2 == 0 else ("engine", "http"):
            t0 = time.perf_counter()
            outputs.add(over_http() if way == "http" else direct(i))
            times[way].append((time.perf_counter() - t0) * 1000)
    load_after = os.getloadavg()
    for way, ms in times.items():
        print(f"{way:6s} median {statistics.median(ms):7.1f} ms  min {min(ms):7.1f}  max {max(ms):7.1f}  "
              f"(n={len(ms)})")
    diff = [h - e for h, e in zip(times["http"], times["engine"], strict=True)]
    print(f"http - engine, per round: median {statistics.median(diff):+.1f} ms")
    print(f"same text both ways: {len(outputs) == 1}; load average {load_before[0]:.2f} -> {load_after[0]:.2f} "
          f"({os.cpu_count()} CPUs); model {engine.name}")
    server.shutdown()
    workspace.close()


if __name__ == "__main__":
    main()
