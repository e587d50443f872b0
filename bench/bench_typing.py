"""A scripted typing session through the real language server process (issue 4).

An editor's view of completion latency: `longllama-lsp` is started over stdio the way an editor
starts it (initializationOptions, workspace folder = a real repository), a real file is opened, and
a line inside a function body is typed character by character:

- every keystroke sends `textDocument/didChange` (incremental) and then an automatic
  `textDocument/inlineCompletion` (the server waits `completion.debounceMs`, 75 ms by default, inside
  a word, and `completion.boundaryDebounceMs`, 0 by default, after a space or punctuation,
  before it generates); the request still open when the next key is pressed gets `$/cancelRequest`,
  as VS Code does;
- keys come every `--interval` seconds (75 ms: a fast typist inside a word); after a word boundary
  (space, punctuation, end of line) the typist pauses for `--think` seconds, and keeps waiting for
  the suggestion if it has not arrived yet (up to `--patience`), so the latency of every request
  at a pause is measured, not only of those fast enough to beat the next key.

Figures per repository-memory size (0 = indexing off; else `memory.budgetTokens`, the repository
indexed once into <workspace>/.longllama and loaded from there):

- latency p50 / p95 of completed requests, client-side (request sent -> reply), debounce included;
  the first completion after opening the file is the warm-up (it encodes the file's own text
  outside the local window into memory and prefills the whole window) and is reported apart;
- the engine's stage timings for each completed request (longllama/status lastTimings): prompt
  (tokenize), memory (assembly), prefill, decode, generated tokens;
- cancelled requests, and the engine worker's time spent on cancelled work (status requests
  cancelledMs) plus the server process's CPU seconds (/proc/<pid>/stat) over the session.

    python bench/bench_typing.py [--memories 0,16384,65536] [--json bench/results/typing.json]
                                 [--md bench/results/typing.md]

The workspace is a copy of /work/data/eval/requests (+ flask without its four largest modules, so
that more than 64k tokens exist) under ~/.cache/longllama-bench/workspace, kept between runs so the
index is reused; without /work/data/eval the stdlib `json` + `http` packages are copied instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from facts import cpu_model  # noqa: E402
from helpers_lsp import SyncClient  # noqa: E402

EVAL = Path("/work/data/eval")
WORKSPACE = Path.home() / ".cache" / "longllama-bench" / "workspace"
# flask modules left out so the workspace holds ~78k tokens (indexing all of flask costs minutes more)
FLASK_DROP = ("app.py", "cli.py", "helpers.py", "sansio")
BOUNDARY = set(" .,()[]{}:=\n")


# -- workspace ------------------------------------------------------------------------------------------

def build_workspace(dest: Path) -> tuple[Path, int, str]:
    """(workspace root, 1-based line to retype, file path relative to root)."""
    if (EVAL / "requests").is_dir():
        if not (dest / "requests").exists():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copytree(EVAL / "requests", dest / "requests")
            if (EVAL / "flask").is_dir():
                shutil.copytree(EVAL / "flask", dest / "flask")
                for name in FLASK_DROP:
                    p = dest / "flask" / "flask" / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        rel = "requests/requests/sessions.py"
        target = "resp = self.send(prep, **send_kwargs)"
    else:  # fallback: stdlib packages
        import http
        import json as json_pkg
        dest = dest.with_name("workspace-stdlib")
        for pkg in (json_pkg, http):
            src = Path(pkg.__file__).parent
            if not (dest / src.name).exists():
                shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("__pycache__"))
        rel = "http/client.py"
        target = "response.begin()"
    lines = (dest / rel).read_text(encoding="utf-8").splitlines()
    line = next(i + 1 for i, text in enumerate(lines) if text.strip() == target)
    return dest, line, rel


# -- the tests' JSON-RPC client (tests/helpers_lsp.py), with timestamps ---------------------------------

class Client(SyncClient):
    """SyncClient plus what the benchmark times: send time of a request, arrival time of its reply."""

    def __init__(self, proc: subprocess.Popen):
        def write(data: bytes) -> None:
            proc.stdin.write(data)
            proc.stdin.flush()
        super().__init__(proc.stdout, write)

    def request_async(self, method: str, params=None) -> tuple[str, float]:
        msg_id = self.next_id()
        msg = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            msg["params"] = params
        sent = time.monotonic()
        self.send(msg)
        return msg_id, sent

    def wait(self, msg_id, timeout: float) -> tuple[float, dict] | None:
        """(arrival time.monotonic(), reply), or None after `timeout` or if the server is gone."""
        try:
            reply = self.wait_reply(msg_id, timeout)
        except AssertionError:
            return None
        return self.received_at.pop(msg_id), reply

    def result(self, method: str, params=None, timeout: float = 600):
        reply = self.request(method, params, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 1)


# -- one session ------------------------------------------------------------------------------------------

def inline_params(uri: str, line: int, col: int, automatic: bool) -> dict:
    return {"textDocument": {"uri": uri}, "position": {"line": line, "character": col},
            "context": {"triggerKind": 2 if automatic else 1}}


def run_session(args, root: Path, rel: str, line_no: int, memory: int, log_dir: Path) -> dict:
    options = {"completion": {"mode": "line"}, "logLevel": "info"}
    if memory == 0:
        options["indexing"] = {"enabled": False}
    else:
        options["memory"] = {"budgetTokens": memory}
    cmd = [args.server, "--log-file", str(log_dir / f"server-{memory}.log")]
    if args.model:
        cmd += ["--model", args.model]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=root)
    client = Client(proc)
    result: dict = {"memory_budget": memory, "init_options": options}
    try:
        client.result("initialize", {"processId": os.getpid(), "rootUri": root.as_uri(), "capabilities": {
            "window": {"workDoneProgress": True}}, "workspaceFolders": [{"uri": root.as_uri(), "name": root.name}],
            "initializationOptions": options}, timeout=300)
        result["initialize_s"] = round(time.perf_counter() - t_start, 2)
        client.notify("initialized", {})
        while True:  # model loaded, repository indexed (or loaded from the index) and watched
            st = client.result("longllama/status")
            if st["engine"] == "error":
                raise RuntimeError(f"engine error: {st.get('error')}")
            # (with indexing off the status may keep saying "waiting")
            if st["engine"] == "ready" and (memory == 0 or st["indexing"] in ("off", "watching", "idle", "error")):
                break
            time.sleep(0.5)
        result["ready_s"] = round(time.perf_counter() - t_start, 2)
        result["indexing"] = st["indexing"]
        result["repository_memory_tokens"] = st["memoryTokens"]
        result["files"], result["chunks"] = st["files"], st["chunks"]
        result["context_tokens"] = st.get("contextTokens")

        path = root / rel
        original = path.read_text(encoding="utf-8").splitlines(keepends=True)
        target = original[line_no - 1]
        indent = target[: len(target) - len(target.lstrip())]
        typed = target.strip()
        text = "".join(original[: line_no - 1]) + indent + "\n" + "".join(original[line_no:])
        uri = path.as_uri()
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                "text": text}})
        line, col = line_no - 1, len(indent)
        # warm-up: an explicit request at the cursor of the freshly opened file
        wid, sent = client.request_async("textDocument/inlineCompletion", inline_params(uri, line, col, False))
        got = client.wait(wid, 600)
        result["warmup_ms"] = round((got[0] - sent) * 1000, 1)
        result["warmup_timings"] = client.result("longllama/status")["lastTimings"]

        before = client.result("longllama/status")["requests"]
        cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
        load = [os.getloadavg()[0]]
        samples, cancelled, empty, version, pending = [], 0, 0, 1, None
        for i, ch in enumerate(typed):
            if pending is not None and pending[0] not in client.replies:
                client.notify("$/cancelRequest", {"id": pending[0]})
                cancelled += 1
            pending = None
            version += 1
            client.notify("textDocument/didChange", {
                "textDocument": {"uri": uri, "version": version},
                "contentChanges": [{"range": {"start": {"line": line, "character": col},
                                              "end": {"line": line, "character": col}}, "text": ch}]})
            col += 1
            rid, sent = client.request_async("textDocument/inlineCompletion", inline_params(uri, line, col, True))
            pending = (rid, sent)
            boundary = ch in BOUNDARY or i == len(typed) - 1
            time.sleep(args.think if boundary else args.interval)
            if boundary:  # a pause: wait for the suggestion (up to --patience)
                got = client.wait(rid, args.patience)
                if got is not None:
                    pending = None
                    items = (got[1].get("result") or {}).get("items") or []
                    timings = client.result("longllama/status")["lastTimings"]
                    samples.append({"keystroke": i + 1, "prefix": typed[: i + 1], "ms": round((got[0] - sent) * 1000, 1),
                                    "text": items[0]["insertText"] if items else "", "timings": timings})
                    empty += not items
            load.append(os.getloadavg()[0])
        if pending is not None:
            client.wait(pending[0], args.patience)
        client.replies.clear()
        client.received_at.clear()
        cpu1, wall1 = cpu_seconds(proc.pid), time.perf_counter()
        after = client.result("longllama/status")["requests"]
        lat = [s["ms"] for s in samples]

        model_runs = [s for s in samples if "typeahead" not in s["timings"]]

        def stage(name: str) -> float | None:  # over the requests the model answered
            return pct([float(s["timings"].get(name, 0)) for s in model_runs], 0.5)

        result.update(
            keystrokes=len(typed), completed=len(samples), empty=empty, cancelled_by_client=cancelled,
            engine_requests={k: after.get(k, 0) - before.get(k, 0) for k in after},
            p50_ms=pct(lat, 0.5), p95_ms=pct(lat, 0.95), max_ms=max(lat) if lat else None,
            typeahead=len(samples) - len(model_runs),
            model_p50_ms=pct([s["ms"] for s in model_runs], 0.5), model_p95_ms=pct([s["ms"] for s in model_runs], 0.95),
            stage_p50_ms={k: stage(k) for k in ("queue", "prompt", "memory", "prefill", "decode", "total")},
            prefill_tokens_p50=stage("prefillTokens"), generated_tokens_p50=stage("generatedTokens"),
            memory_tokens_in_request=samples[-1]["timings"].get("memoryTokens") if samples else None,
            cancelled_work_ms=after.get("cancelledMs", 0) - before.get("cancelledMs", 0),
            completed_work_ms=after.get("completedMs", 0) - before.get("completedMs", 0),
            server_cpu_s=round(cpu1 - cpu0, 2), session_wall_s=round(wall1 - wall0, 2),
            load_avg_during=[round(min(load), 2), round(max(load), 2)], samples=samples)
        client.result("shutdown")
        client.notify("exit", None)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return result


# -- report ----------------------------------------------------------------------------------------------

def machine_facts(threads: int | None) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "nproc": os.cpu_count(), "cpu": cpu_model(),
            "python": platform.python_version(), "torch_threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE (package default)"),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}


def markdown(results: dict, command: str) -> str:
    m = results["machine"]
    out = [f"## Typing session through the LSP (issue 4): `{command}`", "",
           f"Run {m['date']} on {m['nproc']} cores of {m['cpu']}, torch {m.get('torch')} with "
           f"{m['torch_threads']} threads, fp32, default model (SmolLM2-135M as LongLLaMA), single-line mode. "
           f"Load average {m['load_avg_start'][0]} at the start, {m.get('load_avg_end', ['?'])[0]} at the end. "
           f"Typed: `{results['typed']}` into `{results['file']}` line {results['line']} (inside "
           f"`Session.request`), {results['interval_ms']} ms between keys, {results['think_ms']} ms pause after a "
           "word boundary (waiting for the suggestion if it is later). Latency = request sent -> reply, "
           "client side, server debounce included (75 ms inside a word; after a word boundary 0, the default "
           "`boundaryDebounceMs`); completed requests after the warm-up. Torch threads "
           "in the server: 2 for prefill chunks, 1 for few-token steps while the load average exceeds the "
           "cores (engine `decode_threads`).", "",
           "| repository memory | p50 | p95 | max | model-answered p50 / p95 | completed / keystrokes | cancelled "
           "| worker ms on cancelled work | server CPU s (session) | warm-up (first completion) | prefill p50 "
           "| decode p50 | tokens p50 | load avg during |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        model_runs = [s for s in r["samples"] if "typeahead" not in s["timings"]]
        st = {k: pct([float(s["timings"].get(k, 0)) for s in model_runs], 0.5) for k in ("prefill", "decode")}
        r["generated_tokens_p50"] = pct([float(s["timings"].get("generatedTokens", 0)) for s in model_runs], 0.5)
        ahead = len(r["samples"]) - len(model_runs)
        model_pcts = (pct([s["ms"] for s in model_runs], 0.5), pct([s["ms"] for s in model_runs], 0.95))
        out.append(
            f"| {r['repository_memory_tokens']:,} tokens (budget {r['memory_budget'] or 'indexing off'}) "
            f"| **{r['p50_ms']} ms** | **{r['p95_ms']} ms** | {r['max_ms']} ms | {model_pcts[0]} / {model_pcts[1]} ms "
            f"| {r['completed']} ({ahead} typeahead) / {r['keystrokes']} "
            f"| {r['cancelled_by_client']} (engine: {r['engine_requests'].get('cancelled', 0)}) "
            f"| {r['cancelled_work_ms']} | {r['server_cpu_s']} | {r['warmup_ms'] / 1000:.1f} s "
            f"| {st['prefill']} ms | {st['decode']} ms | {r['generated_tokens_p50']} "
            f"| {r['load_avg_during'][0]}-{r['load_avg_during'][1]} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memories", default="0,16384,65536", help="repository memory budgets (0 = indexing off)")
    ap.add_argument("--workspace", type=Path, default=WORKSPACE)
    ap.add_argument("--interval", type=float, default=0.075, help="seconds between keys inside a word")
    ap.add_argument("--think", type=float, default=0.6, help="pause after a word boundary, seconds")
    ap.add_argument("--patience", type=float, default=30.0, help="longest wait for a suggestion at a pause")
    ap.add_argument("--model", help="--model for the server (default: the bundled SmolLM2)")
    ap.add_argument("--server", default=shutil.which("longllama-lsp") or "longllama-lsp")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--render", type=Path, metavar="JSON", help="only rewrite --md from an earlier --json")
    args = ap.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        md = markdown(results, results["command"])
        print(md)
        if args.md:
            args.md.write_text(md)
        return

    import torch  # only for the facts: the server process decides its own threads the same way

    root, line_no, rel = build_workspace(args.workspace)
    facts = machine_facts(torch.get_num_threads())
    facts["torch"] = torch.__version__
    log_dir = root.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    typed = (root / rel).read_text(encoding="utf-8").splitlines()[line_no - 1].strip()
    results = {"machine": facts, "file": rel, "line": line_no, "typed": typed,
               "interval_ms": int(args.interval * 1000), "think_ms": int(args.think * 1000), "runs": []}
    print(json.dumps(facts), flush=True)
    for memory in [int(x) for x in args.memories.split(",")]:
        run = run_session(args, root, rel, line_no, memory, log_dir)
        results["runs"].append(run)
        brief = {k: v for k, v in run.items() if k != "samples"}
        print(json.dumps(brief), flush=True)
        for s in run["samples"]:
            print(f"  {s['ms']:8.1f} ms  {s['prefix']!r:45} -> {s['text']!r}  {s['timings']}", flush=True)
    facts["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    command = "python " + " ".join([sys.argv[0]] + sys.argv[1:])
    results["command"] = command
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    md = markdown(results, command)
    print(md)
    if args.md:
        args.md.write_text(md)


if __name__ == "__main__":
    main()
