"""The passkey as a user meets it: a folder of notes, one of which holds the key, asked through the CLI.

    python bench/user_passkey.py [--model DELTA] [--folders 3] [--json out.json]

Each folder: 12 Markdown notes of the passkey filler (~1k tokens each; ~12k in all), the key sentence
at a random line of one of them, and `question.md` holding "What is the pass key? The pass key is".
Then, as a user would, with the real CLI in a fresh process each (`--no-server`, so no running server
is used): `longllama ask --repo DIR "What is the pass key?"` and `longllama complete question.md:1:38`
in the folder. A folder passes a command when the key is in its answer. `longllama eval --task passkey
--passkey-prompt ask|bare` measures the same with more trials; this script checks the whole path
(indexing Markdown, the selection, ask's prompt, the answer's stop rules) that the eval skips.
The run 9 delta answered neither (a made-up key); why: BENCHMARKS.md, "CPU run 9" and "CPU run 10".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune.passkey import ASK_QUESTION, FILLER, QUESTION


def make_folder(root: Path, key: str, note: int, rng: random.Random, notes: int = 12) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(notes):
        lines = [FILLER] * 50
        if i == note:
            lines.insert(rng.randrange(50), f"The pass key is {key}. Remember it. {key} is the pass key.")
        (root / f"notes_{i:02d}.md").write_text(f"# Notes {i}\n\n" + "\n".join(lines) + "\n")
    (root / "question.md").write_text(QUESTION)


def cli(args: list[str], cwd: Path, model: str | None, knn_weight: float | None = None) -> str:
    cmd = [sys.executable, "-m", "longllama_lsp.cli", *args, "--no-server"] + (["--model", model] if model else []) \
        + (["--knn-weight", str(knn_weight)] if knn_weight is not None else [])
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout.split("\nSources:")[0].strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint or delta (default: the bundled default model)")
    p.add_argument("--folders", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--knn-weight", type=float, help="memory.knnWeight for both commands (default: theirs)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="user-passkey-") as tmp:
        for f in range(args.folders):
            key, note = str(rng.randint(1, 50000)), rng.randrange(12)
            root = Path(tmp) / f"notes-{f}"
            make_folder(root, key, note, rng)
            ask = cli(["ask", "--repo", str(root), ASK_QUESTION], root, args.model, args.knn_weight)
            complete = cli(["complete", "--repo", str(root), f"question.md:1:{len(QUESTION) + 1}"], root, args.model,
                           args.knn_weight)
            results.append({"key": key, "note": f"notes_{note:02d}.md", "ask": ask, "complete": complete,
                            "ask_ok": key in ask, "complete_ok": key in complete})
            print(f"key {key} in notes_{note:02d}.md | ask: {ask[:100]!r} | complete: {complete[:60]!r}", flush=True)
    n = len(results)
    summary = {"folders": n, "ask": sum(r["ask_ok"] for r in results), "complete": sum(r["complete_ok"] for r in results),
               "model": args.model or "default", "threads": os.environ.get("OMP_NUM_THREADS"), "results": results}
    print(f"ask {summary['ask']}/{n}, complete {summary['complete']}/{n}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
