"""Cross-file completion benchmark (issue 8): systems (a)-(d) through the real language server.

    nice -n 10 python bench/crossfile/run.py --systems a,b,c \
        --json bench/results/crossfile.json --md bench/results/crossfile.md
    # (d): the same as (c) with a FoT-fine-tuned checkpoint:
    nice -n 10 python bench/crossfile/run.py --systems d --model CKPT --json ... --md ...

Systems (one model; every prompt is at most the engine's local window, `contextTokens`, 1,024 tokens
for the default model, and (b) gets exactly as many prompt tokens as (a)):
  a  in-file prefix only: `--no-index`, memory.enabled = false (the engine keeps the last
     contextTokens tokens before the cursor, window start moved in steps of contextTokens/4).
  b  (a) + BM25 snippets of other files pasted as comments at the top of the buffer (retrieval.py):
     the benchmark client builds the document it opens (snippets header + the in-file prefix cut to
     fit the same token count (a) sees + the rest of the file) and moves the position accordingly,
     exactly what Tabby/Continue do at prompt level; the server is unchanged.
  m  memory on without a repository index (only the buffer's own text outside the window in
     memory): separates what the repository memory adds from what the file's own memory adds.
  c  our repository memory: memory on, the repository indexed by the server itself (its own
     watcher/indexer, the current file's indexed chunks excluded by the engine), plus buffer memory.
     Since stop 32 the server retrieves (memory.retrieveTokens 4,096 by default): results of (c), (d)
     and (x) before it read every chunk; `--retrieve-tokens 0` compares with them.
  d  (c) with `--model PATH` (a FoT-fine-tuned checkpoint).
  x  (c) with dense memory attention (memory.selectTokens 0: every memory token, as before issue 15);
     (c) against (x) is sparse against dense on the same index.
  h  (c) given (b)'s document: repository memory and the BM25 snippets in the prompt (with --model, that
     checkpoint). Whether memory adds to snippets. The snippet header is an edit of the indexed file, so
     the server also encodes its chunk as an edited chunk of the buffer's memory.
  r  memory filled by lexical retrieval (TurboRAG-like): no index; the document opened is the best BM25
     windows (raw code, `--memory-snippet-tokens`, best last) followed by (a)'s local window, cut so that
     the engine's window is exactly (a)'s; the windows go to memory as buffer blocks before the window,
     the rest of the file as blocks after it. Whether memory of retrieved code beats the same retrieval
     pasted in the prompt (b), which costs half of the prompt.

Each hole: textDocument/didOpen of the file's text up to the hole column + the rest of the file after
the hole line (the hole line's remainder removed), textDocument/inlineCompletion (Invoked, line
mode) at the hole, didClose. Each request uses its own document URI (`...?hole=ID`, same file path),
so no request reuses another's local cache (prefix reuse is exact only with unchanged memory, and the
previous hole's memory holds this hole's answer); buffer blocks before the window stay cached by
token hash, as in an editor. Latency = client wall time of the request; the engine's own timings
come from longllama/status.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from facts import cpu_model  # noqa: E402
from helpers_lsp import SyncClient  # noqa: E402
from metrics import score  # noqa: E402
from retrieval import WINDOW, SnippetIndex, build_header, fit_prefix  # noqa: E402

from longllama_lsp.prompt import window_start  # noqa: E402

SYSTEMS = {
    "a": "in-file prefix only (memory off)",
    "b": "prefix + BM25 snippets (memory off)",
    "m": "memory on, no index (own buffer only)",
    "c": "repository memory (memory on, indexed)",
    "d": "(c) + FoT adapter (--model)",
    "x": "(c) with dense memory attention (selectTokens 0)",
    "h": "(c) + (b)'s BM25 snippets in the prompt",
    "r": "memory of BM25 windows (no index): (a)'s prompt, the best windows in memory",
}


# -- machine and server ------------------------------------------------------------------------------

def machine_facts(threads: int) -> dict:
    cpu = cpu_model()
    mem = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 2**20, 1), "python": platform.python_version(),
            "torch": torch.__version__, "threads": threads, "cuda": torch.cuda.is_available(),
            "git_head": commit, "load_start": os.getloadavg()}


def server_env(threads: int) -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


class Server:
    """One `python -m longllama_lsp.server` process over stdio, driven by tests/helpers_lsp.SyncClient."""

    def __init__(self, root: Path, memory: bool, index: bool, model: str | None, log: Path, threads: int,
                 context_tokens: int | None = None, index_timeout: float = 7200, select_tokens: int | None = None,
                 retrieve_tokens: int | None = None, knn_weight: float | None = None):
        cmd = [sys.executable, "-m", "longllama_lsp.server", "--log-file", str(log)]
        if model:
            cmd += ["--model", model]
        if not index:
            cmd.append("--no-index")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=server_env(threads),
                                     cwd=REPO)
        self.client = SyncClient.over_process(self.proc)
        completion = {"debounceMs": 0, "mode": "line", **({"contextTokens": context_tokens} if context_tokens else {})}
        self.client.initialize(root, {"completion": completion,
                                      "memory": {"enabled": memory,
                                                 **({"selectTokens": select_tokens} if select_tokens is not None else {}),
                                                 **({"retrieveTokens": retrieve_tokens} if retrieve_tokens is not None else {}),
                                                 **({"knnWeight": knn_weight} if knn_weight is not None else {})},
                                      "indexing": {"enabled": index},
                                      "logLevel": "info"}, timeout=600)
        self.index_seconds = None
        deadline = time.monotonic() + index_timeout
        while True:
            st = self.client.status(timeout=600)
            if st["engine"] == "error":
                raise RuntimeError(f"model failed to load: {st.get('error')}")
            if st["engine"] == "ready" and (not index or st["indexing"] in ("watching", "idle", "error")):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("indexing did not finish in time")
            time.sleep(1)
        if index:
            self.index_seconds = round(time.perf_counter() - self.t0, 1)
        self.status = st
        self.context_tokens = int(st["contextTokens"])

    def complete(self, uri: str, text: str, line: int, char16: int) -> tuple[str, float, dict]:
        c = self.client
        c.open(uri, text)
        t0 = time.perf_counter()
        reply = c.complete(uri, line, char16, timeout=900)
        ms = (time.perf_counter() - t0) * 1000
        timings = dict(c.status()["lastTimings"])
        c.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
        if "error" in reply:
            raise RuntimeError(f"completion failed: {reply['error']}")
        items = (reply.get("result") or {}).get("items") or []
        return (items[0]["insertText"] if items else ""), ms, timings

    def peak_rss_kib(self) -> int:
        for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1])
        return 0

    def close(self) -> None:
        try:
            self.client.request("shutdown", timeout=60)
            self.client.notify("exit", None)
            self.proc.wait(60)
        except Exception:  # noqa: BLE001
            self.proc.kill()


# -- holes -> documents --------------------------------------------------------------------------------

def utf16_len(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


def split_at_hole(src: str, hole: dict) -> tuple[str, str]:
    """(text before the cursor, text after it): the hole line's remainder is removed, but for the first
    `typed` characters of it (holes.py --typed: the user has begun the name)."""
    lines = src.split("\n")
    line = lines[hole["line"]]
    assert line[hole["col"]:].rstrip() == hole["expected"], f"{hole['id']}: hole does not match the source"
    before = "\n".join(lines[:hole["line"]] + [line[:hole["col"] + hole.get("typed", 0)]])
    after = "\n" + "\n".join(lines[hole["line"] + 1:])
    return before, after


class Prompter:
    """Documents per system for one hole; (b)'s header is fitted to (a)'s prompt token count."""

    def __init__(self, tokenizer, context_tokens: int, scorer: str, snippet_share: float):
        self.tok, self.ctx, self.scorer, self.share = tokenizer, context_tokens, scorer, snippet_share
        self.indexes: dict[str, SnippetIndex] = {}

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def window_tokens(self, before: str) -> int:
        """How many tokens of `before` the engine keeps as the local window (prompt.build_prompt)."""
        n = self.count(before)
        return n - window_start(n, self.ctx, max(1, self.ctx // 4))

    def retrieval(self, repo: str, root: Path, files: list[str], hole: dict, before: str) -> tuple[str, str, dict]:
        """(header, fitted prefix, info) for system (b)."""
        total = self.window_tokens(before)
        query = "\n".join(before.split("\n")[-WINDOW:])
        hits = self.index(repo, root, files).top(query, hole["path"], self.scorer)
        header, used = build_header(self.count, hits, int(total * self.share))
        prefix = fit_prefix(self.count, header, before, total)
        info = {"prompt_tokens_a": total, "header_tokens": self.count(header) if header else 0,
                "prompt_tokens_b": self.count(header + prefix),
                "snippets": [f"{w.path}:{w.start + 1}-{w.start + len(w.lines)}" for w in used],
                "snippet_has_xfile_def": holds_definition(hole, used)}
        return header, prefix, info

    def index(self, repo: str, root: Path, files: list[str]) -> SnippetIndex:
        """The repository's BM25 windows, built on first use."""
        if repo not in self.indexes:
            self.indexes[repo] = SnippetIndex(root, files)
        return self.indexes[repo]

    def memory_document(self, repo: str, root: Path, files: list[str], hole: dict, before: str, budget: int,
                        paths: bool = True) -> tuple[str, dict]:
        """(the text before the cursor, info) for system (r): BM25 windows of `budget` tokens, then (a)'s
        window. Pad lines after the windows move the engine's window start to exactly where (a)'s is,
        when some padding can (checked: info["window_matches"])."""
        stride = max(1, self.ctx // 4)
        enc = self.tok(before, add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        k = window_start(n, self.ctx, stride)
        window = before[enc["offset_mapping"][k][0]:] if k else before
        query = "\n".join(before.split("\n")[-WINDOW:])
        hits = self.index(repo, root, files).top(query, hole["path"], self.scorer, limit=64, per_file_limit=64)
        chosen, used = [], 0
        for _, w in hits:
            t = self.count(w.raw(paths))
            if used + t <= budget:
                chosen.append(w)
                used += t
        chosen.reverse()  # best nearest the code
        text = "".join(w.raw(paths) for w in chosen)
        mem, start, doc = "", 0, window
        for pad in range(stride + 2):  # pad lines ("#" 2 tokens, "#." 3) until the engine's window is (a)'s
            mem = text + "#\n" * (pad // 2) + "#.\n" * (pad % 2)
            doc = mem + window
            denc = self.tok(doc, add_special_tokens=False, return_offsets_mapping=True)
            dk = window_start(len(denc["input_ids"]), self.ctx, stride)
            start = denc["offset_mapping"][dk][0] if 0 < dk < len(denc["input_ids"]) else 0
            if doc[start:] == window:
                break
        info = {"memory_snippet_tokens": self.count(mem) if mem else 0, "window_matches": doc[start:] == window,
                "snippets": [f"{w.path}:{w.start + 1}-{w.start + len(w.lines)}" for w in chosen],
                "snippet_has_xfile_def": holds_definition(hole, chosen)}
        return doc, info


def holds_definition(hole: dict, windows: list) -> bool | None:
    """Whether any of `windows` names one of the hole's cross-file identifiers (None: an ordinary hole)."""
    if not hole["xfile"]:
        return None
    return any(any(x["name"] in "\n".join(w.lines) for x in hole["xfile"]) for w in windows)


# -- the run -----------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))]  # nearest rank


def summarize(records: list[dict], systems: list[str]) -> dict:
    out: dict = {}
    for s in systems:
        for subset in ("all", "crossfile", "ordinary", "anchor=indent", "anchor=identifier"):
            rs = [r for r in records if r["system"] == s and (subset == "all" or r["kind"] == subset
                                                              or subset == f"anchor={r['anchor']}")]
            if not rs:
                continue
            def mean(k: str, rs: list[dict] = rs) -> float:
                vals = [r["metrics"][k] for r in rs if k in r["metrics"]]
                return round(sum(vals) / max(1, len(vals)), 4)
            lat = [r["latency_ms"] for r in rs]
            row = {"n": len(rs), "em": mean("em"), "em_nows": mean("em_nows"), "es": mean("es"), "id_em": mean("id_em"), "id_f1": mean("id_f1"),
                   "latency_p50_ms": round(percentile(lat, 50)), "latency_p95_ms": round(percentile(lat, 95)),
                   "prefill_ms_mean": round(sum(r["timings"].get("prefill", 0) for r in rs) / len(rs)),
                   "memory_ms_mean": round(sum(r["timings"].get("memory", 0) for r in rs) / len(rs)),
                   "empty_share": round(sum(not r["prediction_line"].strip() for r in rs) / len(rs), 4)}
            if any("xid_hit" in r["metrics"] for r in rs):
                row["xid_hit"] = mean("xid_hit")
            out[f"{s}/{subset}"] = row
    return out


def run_system(system: str, holes: list[dict], args, prompter_factory, done: dict, sink, index_sink) -> None:
    memory = system in ("m", "c", "d", "x", "h", "r")
    index = system in ("c", "d", "x", "h")
    model = args.model if (system in ("d", "h", "r") or args.model_all) else None
    by_repo: dict[str, list[dict]] = {}
    for h in holes:
        by_repo.setdefault(h["repo"], []).append(h)
    server = None
    try:
        for repo, hs in by_repo.items():
            todo = [h for h in hs if (system, h["id"]) not in done]
            if not todo:
                continue
            root = args.work / "repos" / repo
            if server is None or index:
                if server is not None:
                    server.close()
                log = args.work / f"server-{system}-{repo if index else 'all'}.log"
                print(f"[{system}] starting server ({'indexing ' + repo if index else 'no index'})", flush=True)
                server = Server(root, memory, index, model, log, args.threads, args.context_tokens,
                                select_tokens=0 if system == "x" else args.select_tokens,
                                retrieve_tokens=args.retrieve_tokens, knn_weight=args.knn_weight)
                if index:
                    index_sink.write(json.dumps({"system": system, "repo": repo, "seconds_to_ready": server.index_seconds,
                                                 "files": server.status["files"], "chunks": server.status["chunks"],
                                                 "memory_tokens": server.status["memoryTokens"]}) + "\n")
                    index_sink.flush()
                    print(f"[{system}] {repo}: ready after {server.index_seconds} s, {server.status['files']} files, "
                          f"{server.status['memoryTokens']} memory tokens", flush=True)
            prompter = prompter_factory(server.context_tokens)
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if ".longllama" not in p.parts)
            for h in todo:
                src = (root / h["path"]).read_text(encoding="utf-8")
                before, after = split_at_hole(src, h)
                info: dict = {}
                if system in ("b", "h"):
                    header, prefix, info = prompter.retrieval(repo, root, files, h, before)
                    before = header + prefix
                elif system == "r":
                    before, info = prompter.memory_document(repo, root, files, h, before, args.memory_snippet_tokens,
                                                                   args.memory_snippet_paths)
                line = before.count("\n")
                char16 = utf16_len(before[before.rfind("\n") + 1:])
                uri = (root / h["path"]).as_uri() + f"?hole={h['id']}&system={system}"
                text, ms, timings = server.complete(uri, before + after, line, char16)
                pred = h["expected"][:h.get("typed", 0)] + text.split("\n")[0]  # scored as the whole line
                rec = {"system": system, "id": h["id"], "repo": repo, "kind": h["kind"], "anchor": h["anchor"],
                       "expected": h["expected"], "completion": text, "prediction_line": pred,
                       "metrics": score(pred, h["expected"], [x["name"] for x in h["xfile"]]),
                       "latency_ms": round(ms, 1), "timings": timings, **({"retrieval": info} if info else {})}
                done[(system, h["id"])] = rec
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
                print(f"[{system}] {h['id']:14s} em={rec['metrics']['em']:.0f} es={rec['metrics']['es']:.2f} "
                      f"{ms:7.0f} ms  {pred.strip()[:50]!r} | {h['expected'].strip()[:40]!r}", flush=True)
            if index:
                index_sink.write(json.dumps({"system": system, "repo": repo, "peak_rss_kib": server.peak_rss_kib()}) + "\n")
                index_sink.flush()
        if server is not None and not index:
            index_sink.write(json.dumps({"system": system, "peak_rss_kib": server.peak_rss_kib()}) + "\n")
    finally:
        if server is not None:
            server.close()


def table(summary: dict, systems: list[str]) -> str:
    head = ("| system | holes | EM | EM (no whitespace) | ES | ID-EM | ID-F1 | cross-file id hit | empty | latency p50 | p95 |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for subset in ("all", "crossfile", "ordinary"):
        for s in systems:
            r = summary.get(f"{s}/{subset}")
            if r:
                xh = f"{r['xid_hit']:.3f}" if "xid_hit" in r else "-"
                rows.append(f"| ({s}) {SYSTEMS[s]}, {subset} | {r['n']} | {r['em']:.3f} | {r['em_nows']:.3f} | "
                            f"{r['es']:.3f} | {r['id_em']:.3f} | {r['id_f1']:.3f} | {xh} | {r['empty_share']:.2f} | "
                            f"{r['latency_p50_ms'] / 1000:.1f} s | {r['latency_p95_ms'] / 1000:.1f} s |")
    return head + "\n".join(rows) + "\n"


def examples(records: list[dict], holes: dict, mem: str, base: str, better: bool, k: int = 5) -> list[dict]:
    by = {(r["system"], r["id"]): r for r in records}
    out = []
    for hid, h in holes.items():
        rm, rb = by.get((mem, hid)), by.get((base, hid))
        if rm is None or rb is None:
            continue
        d = rm["metrics"]["es"] - rb["metrics"]["es"]
        if (d > 0) == better and d != 0:
            out.append((abs(d), {"id": hid, "path": h["path"], "line": h["line"] + 1, "kind": h["kind"],
                                 "expected": h["expected"].strip(), mem: rm["prediction_line"].strip(),
                                 base: rb["prediction_line"].strip(), "es_delta": round(d, 3)}))
    out.sort(key=lambda x: -x[0])
    return [e for _, e in out[:k]]


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it (a --holes file
    elsewhere crashed the summary after the whole run)."""
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Cross-file completion benchmark through the LSP server.")
    p.add_argument("--holes", type=Path, default=HERE / "holes.jsonl")
    p.add_argument("--data", type=Path, default=Path("/work/data/eval"), help="pristine repositories (copied to --work)")
    p.add_argument("--work", type=Path, default=Path("/tmp/longllama-crossfile"),
                   help="scratch: repository copies (the server writes its index into <repo>/.longllama), logs")
    p.add_argument("--systems", default="a,b,c", help="comma list of a,b,m,c,d,x,h,r (d needs --model)")
    p.add_argument("--model", help="checkpoint for (d) (and for every system with --model-all)")
    p.add_argument("--model-all", action="store_true", help="use --model for every system, not only (d)")
    p.add_argument("--repos", help="comma list: only these repositories")
    p.add_argument("--per-repo", type=int, help="only N evenly spaced holes of each repository (smoke runs, CPU budget)")
    p.add_argument("--scorer", choices=("bm25", "jaccard"), default="bm25", help="retrieval scorer for (b)")
    p.add_argument("--snippet-share", type=float, default=0.5, help="most of (b)'s prompt tokens given to snippets")
    p.add_argument("--memory-snippet-tokens", type=int, default=2048, help="(r): tokens of BM25 windows in memory")
    p.add_argument("--no-memory-snippet-paths", dest="memory_snippet_paths", action="store_false",
                   help="(r): the windows without their `# Path:` line")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    p.add_argument("--context-tokens", type=int, default=512,
                   help="completion.contextTokens for every system: the prompt budget (default 512; 0 = the "
                        "engine's default, last_context_length = 1024 for the default model)")
    p.add_argument("--select-tokens", type=int, default=None, metavar="N",
                   help="memory.selectTokens of (c)/(d)/(m): the sparse budget (default: the server's, 2,048)")
    p.add_argument("--retrieve-tokens", type=int, default=None, metavar="N",
                   help="memory.retrieveTokens of the memory systems: only the N tokens of other files' chunks "
                        "that best match the code before the cursor (default: the server's)")
    p.add_argument("--knn-weight", type=float, default=None, metavar="W",
                   help="memory.knnWeight of the memory systems: the kNN lookup's share of each step's distribution "
                        "(0: off; default: the server's)")
    p.add_argument("--resume", action="store_true", help="keep the per-hole results already in --work")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing: summarize the per-hole results in --work over the holes every listed system "
                        "has finished (with --resume semantics)")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path, help="write the generated table and examples here")
    args = p.parse_args(argv)
    args.context_tokens = args.context_tokens or None
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := [s for s in systems if s not in SYSTEMS]:
        p.error(f"unknown systems {bad}")
    if "d" in systems and not args.model:
        p.error("system d needs --model PATH (the FoT-fine-tuned checkpoint)")

    holes = [json.loads(ln) for ln in args.holes.read_text().splitlines() if ln.strip()]
    every_hole = list(holes)
    if args.repos:
        holes = [h for h in holes if h["repo"] in args.repos.split(",")]
    if args.per_repo:  # evenly spaced over each repository's holes (they are in file/line order)
        picked = []
        for repo in dict.fromkeys(h["repo"] for h in holes):
            hs = [h for h in holes if h["repo"] == repo]
            n = min(args.per_repo, len(hs))
            picked += [hs[(j * len(hs)) // n] for j in range(n)]
        holes = picked
    args.work.mkdir(parents=True, exist_ok=True)
    for repo in sorted({h["repo"] for h in holes}):
        if not (args.work / "repos" / repo).exists():
            shutil.copytree(args.data / repo, args.work / "repos" / repo)

    from longllama_lsp.model.loading import load_tokenizer
    from longllama_lsp.resolve import resolve_model
    tokenizer = load_tokenizer(resolve_model(explicit=args.model if args.model_all else None))

    facts = machine_facts(args.threads)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    done: dict = {}
    index_rows: list[dict] = []
    for s in systems:  # one results file per system, so systems can run in separate processes
        results_path, index_path = args.work / f"results-{s}.jsonl", args.work / f"index-{s}.jsonl"
        if args.resume and results_path.exists():
            for ln in results_path.read_text().splitlines():
                r = json.loads(ln)
                done[(r["system"], r["id"])] = r
        if args.summarize_only:
            if results_path.exists():
                for ln in results_path.read_text().splitlines():
                    r = json.loads(ln)
                    done[(r["system"], r["id"])] = r
        else:
            mode = "a" if args.resume else "w"
            with results_path.open(mode) as sink, index_path.open(mode) as index_sink:
                run_system(s, holes, args, lambda ctx: Prompter(tokenizer, ctx, args.scorer, args.snippet_share),
                           done, sink, index_sink)
        if index_path.exists():
            index_rows += [json.loads(ln) for ln in index_path.read_text().splitlines() if ln.strip()]
    by_id = {h["id"]: h for h in every_hole}
    for r in done.values():  # metrics from the stored completions (so metric changes need no rerun)
        r["metrics"] = score(r["prediction_line"], r["expected"], [x["name"] for x in by_id[r["id"]]["xfile"]])
    if args.summarize_only:  # the holes every system finished
        holes = [h for h in holes if all((s, h["id"]) in done for s in systems)]
    index_info = {"rows": index_rows}
    ids = {h["id"] for h in holes}
    records = [r for (s, i), r in done.items() if s in systems and i in ids]
    summary = summarize(records, systems)
    facts["load_end"] = os.getloadavg()
    hole_map = {h["id"]: h for h in holes}
    ex = {}
    mem_sys = "d" if "d" in systems else "c"
    if mem_sys in systems:
        for base in ("a", "b"):
            if base in systems:
                ex[f"{mem_sys}_beats_{base}"] = examples(records, hole_map, mem_sys, base, True)
                ex[f"{mem_sys}_loses_to_{base}"] = examples(records, hole_map, mem_sys, base, False)
    out = {"issue": 8, "started": started, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, _shown(Path(sys.argv[0]))] + sys.argv[1:]),
           "machine": facts, "systems": {s: SYSTEMS[s] for s in systems},
           "config": {"holes": _shown(args.holes),
                      "n_holes": len(holes), "context_tokens": args.context_tokens or "engine default",
                      "scorer": args.scorer, "snippet_share": args.snippet_share,
                      "retrieval_window_lines": WINDOW, "select_tokens": args.select_tokens or "server default",
                      "retrieve_tokens": args.retrieve_tokens if args.retrieve_tokens is not None else "server default",
                      "knn_weight": args.knn_weight if args.knn_weight is not None else "server default",
                      "model": args.model or "default (bundled SmolLM2-135M LongLLaMA)"},
           "index": index_info, "summary": summary, "examples": ex, "records": records}
    # Systems that also ran on holes outside this selection (e.g. a/b on all holes, c on --per-repo):
    all_ids = {h["id"] for h in every_hole}
    full = [r for (s, i), r in done.items() if s in systems and i in all_ids]
    if len(full) > len(records):
        out["summary_every_hole_run"] = summarize(full, systems)
    tbl = table(summary, systems)
    print(f"\n{facts['cpu']}, {facts['cores']} cores, {facts['mem_gib']} GiB, torch {facts['torch']}, "
          f"{args.threads} threads, load {facts['load_start']} -> {facts['load_end']}")
    print(tbl)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    if args.md:
        lines = [f"Generated {out['finished']} by `{out['command']}`\n", tbl]
        for k, v in ex.items():
            lines.append(f"\n{k.replace('_', ' ')}:\n")
            lines += [f"- `{e['path']}:{e['line']}` ({e['kind']}): expected `{e['expected']}`; "
                      + "; ".join(f"({s}) `{e[s]}`" for s in e if len(s) == 1) + f" (ES delta {e['es_delta']:+})"
                      for e in v]
        args.md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
