"""Indexing with the default model (SmolLM2-135M as LongLLaMA) on a real tree of stdlib code:

- throughput: tokens encoded per second (encode phase, and end to end including walk + chunk + store);
- size: bytes on disk per token (SQLite file + WAL) against the raw memory bytes per token;
- freshness: seconds from an atomic file save to the bank holding the edited function's new memory
  (watcher path: inotify -> debounce -> chunk -> encode -> store -> bank), median of several edits;
- bank load: seconds and GB/s to fill a fresh MemoryBank from SQLite (page cache warm);
- peak RSS; machine facts (cores, threads, load average, OpenMP wait policy).

    python bench/bench_index.py [--quick] [--json bench/results/index.json] [--threads N]
                                [--wait-policy passive] [--profile 24]

The tree is a copy of whole stdlib packages (full: >= 1M characters; --quick: `json` only), so the
chunk sizes and token statistics are those of real code. `--wait-policy passive` sets
OMP_WAIT_POLICY before torch loads: on a busy machine spinning OpenMP threads make each of the
thousands of small ops per chunk wait for a descheduled partner (see docs in the encoder profile:
`--profile N` prints where the encode time goes for N chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from facts import cpu_model

FULL_PACKAGES = ("json", "email", "asyncio", "logging")  # ~1.1M characters of stdlib code
QUICK_PACKAGES = ("json",)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="index only `json` (a few minutes on 2 busy cores)")
    ap.add_argument("--packages", help=f"comma-separated stdlib packages (default: {','.join(FULL_PACKAGES)})")
    ap.add_argument("--edits", type=int, default=None, help="one-function edits timed (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--wait-policy", choices=["default", "passive"], default="default",
                    help="OMP_WAIT_POLICY for torch's OpenMP threads (must be set before torch loads)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile encoding N chunks with torch.profiler and print the top ops")
    ap.add_argument("--keep", type=Path, help="build the tree and index here instead of a temp dir")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap.parse_args()


def machine_facts() -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
             "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
             "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M")}
    return facts


def build_tree(dest: Path, packages: tuple[str, ...]) -> int:
    """Copy whole stdlib packages (no tests, no bytecode) into dest; returns the characters copied."""
    stdlib = Path(json.__file__).parent.parent
    for name in packages:
        shutil.copytree(stdlib / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "test", "tests"))
    return sum(len(p.read_text(encoding="utf-8", errors="replace")) for p in dest.rglob("*.py"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    """Current resident set (Linux), to see which phase the peak comes from."""
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return float("nan")
    return round(kib / 1024, 1)


class Phases:
    """Progress callback that records when the scan and encode phases end."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.scan_end = self.encode_start = None
        self.last_print = 0.0

    def __call__(self, p) -> None:
        now = time.perf_counter()
        if p.phase == "scan" and p.done == p.total:
            self.scan_end = now
        if p.phase == "encode":
            self.encode_start = self.encode_start or now
            if now - self.last_print > 30 or p.done == p.total:
                self.last_print = now
                print(f"  encode {p.done}/{p.total} chunks, {p.tokens} tokens, {p.tokens_per_s:.0f} tok/s, "
                      f"{now - self.t0:.0f} s", flush=True)


def index_once(root: Path, model, tok, model_dir) -> dict:
    from indexer.pipeline import Indexer

    phases = Phases()
    with Indexer.open(root, model, tok, model_dir) as ix:
        summary = ix.index(progress=phases)
        enc = ix.encoder.stats
        stats = ix.store.stats()
        again = ix.index()
    on_disk = sum(p.stat().st_size for p in Path(stats.path).parent.glob(Path(stats.path).name + "*")
                  if not p.name.endswith(".lock"))  # after close: WAL checkpointed into the file
    fp = ix.store.fingerprint
    raw_per_token = 2 * len(fp.mem_layers) * fp.kv_heads * fp.head_dim * fp.torch_dtype.itemsize
    return {
        "files": summary.files_indexed, "chunks": summary.chunks, "chunks_encoded": summary.chunks_encoded,
        "tokens": stats.tokens, "tokens_encoded": summary.tokens_encoded,
        "seconds_total": round(summary.seconds, 1),
        "seconds_scan": round((phases.scan_end or phases.t0) - phases.t0, 1),
        "seconds_encode_model": round(enc.seconds, 1),
        "encode_tok_s": round(enc.tokens / enc.seconds, 1) if enc.seconds else None,  # chunk tokens
        "context_tokens_encoded": enc.context_tokens,  # encoded before each chunk and dropped
        "end_to_end_tok_s": round(summary.tokens_encoded / summary.seconds, 1),
        "bytes_on_disk": on_disk, "bytes_per_token": round(on_disk / stats.tokens, 1),
        "raw_memory_bytes_per_token": raw_per_token,
        "mean_chunk_tokens": round(stats.tokens / max(stats.chunks, 1), 1),
        "second_pass_s": round(again.seconds, 2), "second_pass_encoded": again.chunks_encoded,
        "db": stats.path,
    }


def function_edits(root: Path, n: int) -> list[tuple[Path, str]]:
    """n (file, function name) pairs spread over the tree: top-level `def`s with a body line after."""
    picks = []
    files = sorted(root.rglob("*.py"))
    for path in files[:: max(1, len(files) // (2 * n))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.startswith("def ") and line.rstrip().endswith(":") and lines[i + 1].startswith("    "):
                picks.append((path, line[4:line.index("(")]))
                break
        if len(picks) == n:
            break
    return picks


def save_to_memory_latency(root: Path, model, tok, model_dir, edits: int) -> dict:
    """Atomic saves of one-function edits: time until the bank holds the edited text's new memory (what
    other files' completions see), and until the whole update is done (the chunks below the edit
    re-encoded after it too)."""
    from indexer.pipeline import Indexer

    with Indexer.open(root, model, tok, model_dir) as ix:
        ix.index()
        done = threading.Event()
        last = {}
        ix.start_watching(on_update=lambda s: (last.update(summary=s), done.set()))
        times, whole, encoded = [], [], []
        for n, (path, name) in enumerate(function_edits(root, edits)):
            rel = path.relative_to(root).as_posix()
            before = {r.content_hash for r in ix.bank.resident().values() if r.path == rel}
            text = path.read_text(encoding="utf-8").replace(f"def {name}(", f"def {name}(  # edit {n}\n        ", 1)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            done.clear()
            t0 = time.perf_counter()
            os.replace(tmp, path)  # the editor's atomic save
            while True:  # a new text of the file resident: the edit's memory
                assert time.perf_counter() - t0 < 120, f"no new memory for {rel}"
                with ix.lock:
                    now = {r.content_hash for r in ix.bank.resident().values() if r.path == rel}
                if now - before:
                    break
                time.sleep(0.01)
            times.append(time.perf_counter() - t0)
            assert done.wait(120), f"no update for {rel}"
            whole.append(time.perf_counter() - t0)
            encoded.append(last["summary"].chunks_encoded)
            print(f"  edit {rel}:{name}: {times[-1]:.2f} s, whole update {whole[-1]:.2f} s "
                  f"({encoded[-1]} chunk(s) re-encoded)", flush=True)
    return {"edits": len(times), "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "update_median_s": round(statistics.median(whole), 3),
            "chunks_reencoded": encoded, "debounce_s": 0.3}


def bank_load(db: str, device: str = "cpu", repeats: int = 3) -> dict:
    from indexer.bank import MemoryBank
    from indexer.store import Store

    times = []
    with Store.open(db, None, readonly=True) as store:
        mem_bytes = store.stats().memory_bytes
        for _ in range(repeats):
            bank = MemoryBank.for_store(store, device)
            t0 = time.perf_counter()
            bank.load_from_store(store)
            times.append(time.perf_counter() - t0)
            tokens = bank.status().live_tokens
            del bank
    best = min(times)
    return {"memory_bytes": mem_bytes, "tokens": tokens, "seconds_best": round(best, 3),
            "seconds_median": round(statistics.median(times), 3), "gb_per_s": round(mem_bytes / best / 1e9, 3),
            "page_cache": "warm"}


def profile_encoder(root: Path, model, tok, n: int) -> list[dict]:
    """Where encode time goes: torch.profiler op totals while encoding n real chunks."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from indexer.chunker import chunk_file
    from indexer.encoder import Encoder

    enc = Encoder(model, tok)
    texts = []
    for path in sorted(root.rglob("*.py")):
        texts += [c.text for c in chunk_file(path.name, path.read_bytes(), enc.count_tokens, 256).chunks]
        if len(texts) >= n:
            break
    texts = texts[:n]
    enc.encode(texts[:2])  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        enc.encode(texts)
        seconds = time.perf_counter() - t0
    tokens = sum(len(enc.token_ids(t)) for t in texts)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print(f"profile: {n} chunks, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tok/s "
          f"(threads {torch.get_num_threads()})")
    out = []
    for e in rows:
        share = e.self_cpu_time_total / total
        out.append({"op": e.key, "share": round(share, 4), "calls": e.count})
        print(f"  {e.key:<50} {100 * share:5.1f}%  {e.count:6d} calls")
    return out


def main() -> None:
    args = parse_args()
    if args.wait_policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, when torch's OpenMP runtime loads
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from longllama_lsp.model.loading import load_model, load_tokenizer
    from longllama_lsp.resolve import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    packages = tuple(args.packages.split(",")) if args.packages else (QUICK_PACKAGES if args.quick else FULL_PACKAGES)
    edits = args.edits or (3 if args.quick else 7)
    results: dict = {"machine": machine_facts(), "packages": packages}
    print(json.dumps(results["machine"]), flush=True)

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-index-"))
    root = work / "tree"
    if root.exists():
        shutil.rmtree(root)
    results["characters"] = build_tree(root, packages)
    print(f"tree: {', '.join(packages)}: {results['characters']:,} characters", flush=True)

    t0 = time.perf_counter()
    model_dir = resolve_model()
    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    results["model"] = {"dir": str(model_dir), "load_s": round(time.perf_counter() - t0, 1),
                        "mem_layers": model.config.mem_layers, "mem_dtype": model.config.mem_dtype,
                        "window": model.window}
    if args.profile:
        results["encoder_profile"] = profile_encoder(root, model, tok, args.profile)

    print("indexing ...", flush=True)
    results["index"] = ix = index_once(root, model, tok, model_dir)
    results["rss_mib"] = {"after_index": rss_mib(), "peak_after_index": round(peak_rss_mib(), 1)}
    print(f"index: {ix['files']} files, {ix['chunks']} chunks, {ix['tokens']:,} tokens in {ix['seconds_total']} s; "
          f"encode {ix['encode_tok_s']} tok/s (model only), {ix['end_to_end_tok_s']} tok/s end to end; "
          f"{ix['bytes_per_token']} bytes/token on disk (raw memory {ix['raw_memory_bytes_per_token']}); "
          f"second pass {ix['second_pass_s']} s, {ix['second_pass_encoded']} encoded", flush=True)

    results["bank_load"] = bl = bank_load(ix["db"])
    results["rss_mib"].update(after_bank_load=rss_mib(), peak_after_bank_load=round(peak_rss_mib(), 1))
    print(f"bank load: {bl['tokens']:,} tokens, {bl['memory_bytes'] / 2**20:.1f} MiB in {bl['seconds_best']} s "
          f"= {bl['gb_per_s']} GB/s (warm page cache)", flush=True)

    print("save -> memory latency ...", flush=True)
    results["save_to_memory"] = sl = save_to_memory_latency(root, model, tok, model_dir, edits)
    print(f"save -> memory: median {sl['median_s']} s over {sl['edits']} edits "
          f"(min {sl['min_s']}, max {sl['max_s']}; debounce {sl['debounce_s']} s); "
          f"whole update median {sl['update_median_s']} s", flush=True)

    results["peak_rss_mib"] = round(peak_rss_mib(), 1)
    results["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(f"peak RSS: {results['peak_rss_mib']} MiB (by phase: {results['rss_mib']})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
