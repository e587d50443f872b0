"""Load over TCP (issue #9): N editors connected at once to one `longllama-lsp --tcp` process.

One server process (`--tcp` on a free 127.0.0.1 port, `--no-index`), warmed by one client (model
load + a first completion), then N clients connect (each its own LSP session, all sharing the one
model) and each runs M rounds of tests/helpers_lsp.editor_loop on its own document:

    completion A left in flight -> didChange (A is stale now) -> completion B + $/cancelRequest B
    -> completion C, waited for -> the replies to A and B        (3 requests, 1 edit per round)

Reported: per-request latency p50/p95/max (client side, send -> reply, over every request: stale
and cancelled ones are answered fast, so C's latency is also reported apart: waited_p50/p95), answered (a result)
vs cancelled (RequestCancelled) vs failed (any other error or no reply within --timeout) counts, wall
time, the server's RSS after warm-up and its peak RSS (VmHWM from /proc/<pid>/status), machine facts.

    python bench/bench_load.py --tiny [--clients 4] [--rounds 10] [--json out.json]
    python bench/bench_load.py [--model PATH] [--clients 4] [--rounds 5]      # default: bundled SmolLM2

--tiny builds the seeded tiny LongLLaMA the tests use (2 layers, SmolLM2 tokenizer, window 1024).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from facts import cpu_model  # noqa: E402
from helpers_lsp import LoadStats, SyncClient, editor_loop, free_port, server_env  # noqa: E402

SOURCE = 'import os\n\n\ndef greet(name):\n    """Say hello."""\n    print("hello", name)\n\n\ndef main():\n    gre'


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def machine_facts() -> dict:
    facts = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "nproc": os.cpu_count(),
             "affinity": len(os.sched_getaffinity(0)), "python": platform.python_version(),
             "loadavg_before": os.getloadavg(), "cpu": cpu_model()}
    try:
        import torch
        facts["torch"] = torch.__version__
    except ImportError:
        pass
    return facts


def tiny_model(dest: Path) -> Path:
    from helpers_models import build_tokenizer_dir, write_tiny_model

    tok = build_tokenizer_dir(dest / "tokenizer")
    return write_tiny_model(dest / "tiny", tok, max_position_embeddings=1024)


def run(args: argparse.Namespace) -> dict:
    facts = machine_facts()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    model = str(tiny_model(work)) if args.tiny else args.model
    port = free_port()
    cmd = [sys.executable, "-m", "longllama_lsp.server", "--tcp", "--port", str(port), "--no-index",
           "--log-file", str(work / "server.log"), *(["--model", model] if model else [])]
    token = secrets.token_urlsafe(16)  # every TCP client sends the server's token
    proc = subprocess.Popen(cmd, env=server_env(LONGLLAMA_TOKEN=token), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = {"completion": {"maxTokens": args.max_tokens, "debounceMs": 0}, "token": token}
    root = work / "ws"
    root.mkdir()
    try:
        t0 = time.monotonic()
        warm = SyncClient.over_tcp("127.0.0.1", port, timeout=600)
        assert "result" in warm.initialize(root, options, timeout=600)
        uri = (root / "warm.py").as_uri()
        warm.open(uri, SOURCE)
        first = warm.complete(uri, 9, 7, timeout=600)
        assert "result" in first, first
        warm_s = time.monotonic() - t0
        status = warm.status()
        rss_warm = proc_kib(proc.pid, "VmRSS")
        clients = [SyncClient.over_tcp("127.0.0.1", port) for _ in range(args.clients)]
        for c in clients:
            assert "result" in c.initialize(root, options, timeout=120)
        stats = LoadStats()

        def loop(i: int, client: SyncClient) -> None:
            editor_loop(client, (root / f"c{i}.py").as_uri(), SOURCE, 9, 7, args.rounds, stats, args.timeout)

        threads = [threading.Thread(target=loop, args=(i, c)) for i, c in enumerate(clients)]
        t1 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout * args.rounds * 3 + 60)
        wall = time.monotonic() - t1
        hung = sum(t.is_alive() for t in threads)
        end_status = clients[0].status() if proc.poll() is None else {}
        out = {
            "model": status.get("model"), "device": status.get("device"), "dtype": status.get("dtype"),
            "clients": args.clients, "rounds": args.rounds, "max_tokens": args.max_tokens,
            **stats.summary(), "hung_clients": hung, "wall_s": round(wall, 2),
            "throughput_req_s": round(len(stats.latencies) / wall, 2) if wall else None,
            "warmup_s": round(warm_s, 1), "rss_after_warmup_mb": round(rss_warm / 1024),
            "rss_end_mb": round(proc_kib(proc.pid, "VmRSS") / 1024) if proc.poll() is None else None,
            "rss_peak_mb": round(proc_kib(proc.pid, "VmHWM") / 1024) if proc.poll() is None else None,
            "server_alive": proc.poll() is None, "pending_after": end_status.get("pending"),
            "engine_requests": end_status.get("requests"), "failures_sample": stats.failures[:3],
            "machine": {**facts, "loadavg_after": os.getloadavg()}, "command": " ".join(sys.argv),
        }
        return out
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the seeded tiny test model (else --model or the default)")
    p.add_argument("--model", help="a model folder/GGUF (default: the bundled SmolLM2-135M)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10, help="rounds per client (3 requests + 1 edit each)")
    p.add_argument("--max-tokens", type=int, default=16, help="completion.maxTokens")
    p.add_argument("--timeout", type=float, default=120, help="seconds a reply may take before it counts as failed")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    out = run(args)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if not out["failures"] and not out["hung_clients"] and out["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
