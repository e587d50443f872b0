"""`longllama complete` with and without a running server (issue 19), A/B in one run.

A small repository nobody here wrote (default: a copy of the installed `mdurl` package, 6 files,
18 KB) is indexed once (`longllama index`, so both sides find the cache warm). Then:

    A  longllama complete ...   no server running: loads the model, opens the index, completes, exits
    B  longllama complete ...   finds this user's `longllama serve --tcp` (its server record) with the
                                repository open, completes through it

A runs first, then the server is started (not timed) with an LSP session keeping the repository
open, as an editor would, then B. (They cannot alternate: while a server watches the repository it
holds the index's writer lock, and a second process refuses to open it.) Wall time per call
(subprocess start to exit) and the 1-minute load average next to it.

    python bench/bench_cli_server.py [--repo DIR] [--file REL:LINE:COL] [--rounds 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longllama_lsp import remote  # noqa: E402
from longllama_lsp.auth import running_servers  # noqa: E402


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "longllama_lsp.cli", *args]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return wall, load, out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", help="repository (default: a copy of the installed mdurl package)")
    ap.add_argument("--file", default="mdurl/_parse.py:114:14", help="REL:LINE:COL inside the repository")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", help="the model of the server and of the A calls (default: the bundled one)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("LONGLLAMA_TOKEN", None)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    if args.repo:
        repo = Path(args.repo).resolve()
    else:
        import mdurl

        repo = work / "repo"
        shutil.copytree(Path(mdurl.__file__).parent, repo / "mdurl", ignore=shutil.ignore_patterns("__pycache__"))
    rel, line, col = args.file.rsplit(":", 2)
    location = f"{repo / rel}:{line}:{col}"
    model = ["--model", args.model] if args.model else []

    t_index, load, _ = timed(cli("index", "--repo", str(repo), *model), env)
    print(f"index (once): {t_index:.1f} s, load {load:.1f}")
    rows: dict[str, list[tuple[float, float]]] = {"no server (loads the model)": [], "through the running server": []}

    def run(name: str, extra: list[str]) -> None:
        for _ in range(args.rounds):
            wall, load, text = timed(cli("complete", "--repo", str(repo), location, *extra), env)
            rows[name].append((wall, load))
            print(f"{name}: {wall:.2f} s (load {load:.1f}) -> {text!r}", flush=True)

    run("no server (loads the model)", model)
    server = subprocess.Popen(cli("serve", "--tcp", "--port", "0", *model), env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "server.log", "w"))
    try:
        while not running_servers("lsp"):
            time.sleep(0.2)
        record = running_servers("lsp")[0]
        editor = remote.session(record, repo, {}, timeout=1800, memory=True)  # the editor keeps the root open
        run("through the running server", [])
        editor.close()
    finally:
        server.terminate()
        server.wait(30)
    print(json.dumps({name: {"median_s": round(statistics.median(w for w, _ in r), 2),
                             "runs_s": [round(w, 2) for w, _ in r], "load": [round(lo, 1) for _, lo in r]}
                      for name, r in rows.items()}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
