"""Issue 6 end to end: evaluate, FoT-train the default model's memory layers, evaluate again.

    python bench/train_default_memory.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --train-data /work/data/train --eval-data /work/data/eval --out results/ --budget-s 540

Stages, each a subprocess of the `longllama` CLI (or of this file) so one failing stage is reported
and the rest still run:
  convert        the GGUF into a LongLLaMA checkpoint exactly as the product's default does
  eval_before    `longllama eval`: held-out perplexity with no / own / repo / repo+distractor memory
  passkey_before the paper's passkey probe at 4k, 16k, 64k tokens
  train          `longllama train finetune/configs/default-memory.toml` for what the budget leaves
  eval_after, passkey_after   the same on the trained weight delta
Everything lands in --out: results.json (rewritten after every stage), the delta
(adapter.safetensors + adapter.json), training.json and metrics.jsonl. Training time is whatever
--budget-s leaves after the measured cost of the "before" stages, so the run ends inside the budget.
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
CONFIG = ROOT / "finetune" / "configs" / "default-memory.toml"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "longllama_lsp.cli", *args]


class Run:
    """Runs stages, times them and keeps results.json current."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.start, self.budget_s = out, time.monotonic(), budget_s
        self.results: dict = {"stages": {}, "facts": machine_facts(), "budget_s": budget_s}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def stage(self, name: str, cmd: list[str], timeout: float) -> bool:
        timeout = max(10.0, min(timeout, self.left()))
        print(f"\n=== {name} (timeout {timeout:.0f} s): {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        seconds = round(time.monotonic() - t0, 1)
        self.results["stages"][name] = {"rc": rc, "seconds": seconds}
        print(f"=== {name}: rc={rc} in {seconds} s", flush=True)
        self.save()
        return rc == 0

    def attach(self, key: str, path: Path) -> None:
        if path.is_file():
            self.results[key] = json.loads(path.read_text())
            self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")


def machine_facts() -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        facts["transformers"] = transformers.__version__
    except ImportError:
        pass
    return facts


def eval_cmd(model: Path, data: Path, out_json: Path, args) -> list[str]:
    repos = [str(data / r) for r in args.eval_repos.split(",")]
    cmd = cli("eval", "--model", str(model), "--json", str(out_json), "--no-progress",
              "--heldout-fraction", str(args.heldout_fraction), "--languages", ".py",
              "--batch-size", str(args.eval_batch_size))
    for r in repos:
        cmd += ["--repo", r]
    for d in args.distractors.split(","):
        cmd += ["--distractors-from", str(data / d)]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    return cmd


def passkey_cmd(model: Path, out_json: Path, args) -> list[str]:
    return [sys.executable, __file__, "passkey", "--model", str(model), "--json", str(out_json),
            "--lengths", args.passkey_lengths, "--trials", str(args.passkey_trials)]


def train_cmd(model: Path, run_dir: Path, data: Path, minutes: float, args) -> list[str]:
    sources = json.dumps([str(p) for p in sorted(data.iterdir()) if p.is_dir()])
    cmd = cli("train", str(args.config), "--model", str(model), "--out", str(run_dir),
              "-o", f"data.sources={sources}", "-o", f"train.max_minutes={minutes:.2f}",
              "-o", "train.steps=1000000", "-o", "train.progress=false")
    for o in args.train_override:
        cmd += ["-o", o]
    return cmd


def main_run(args) -> int:
    run = Run(args.out, args.budget_s)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = work / "model"
        ok = run.stage("convert", [sys.executable, "-c",
                                   "import sys; from longllama_lsp.convert import convert; "
                                   "convert(sys.argv[1], sys.argv[2], overwrite=True)", str(args.gguf), str(model)],
                       timeout=300)
        if not ok:
            return 1
    before_t0 = time.monotonic()
    if not args.skip_before:
        run.stage("eval_before", eval_cmd(model, args.eval_data, work / "eval_before.json", args), timeout=240)
        run.attach("eval_before", work / "eval_before.json")
        run.stage("passkey_before", passkey_cmd(model, work / "passkey_before.json", args), timeout=240)
        run.attach("passkey_before", work / "passkey_before.json")
    after_cost = time.monotonic() - before_t0 if not args.skip_before else args.after_reserve_s
    minutes = (run.left() - after_cost - args.margin_s - 30) / 60  # 30 s: the trainer's start and save
    run.results["train_minutes"] = round(minutes, 2)
    if minutes < args.min_train_minutes:
        print(f"only {minutes:.1f} min left for training: skipped", flush=True)
        return 1
    run_dir = work / "run"
    run.stage("train", train_cmd(model, run_dir, args.train_data, minutes, args), timeout=minutes * 60 + 240)
    for name in ("adapter.safetensors", "adapter.json", "training.json", "metrics.jsonl"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, args.out / name)
    if not (run_dir / "adapter.json").is_file():
        return 1
    run.stage("eval_after", eval_cmd(run_dir, args.eval_data, work / "eval_after.json", args), timeout=240)
    run.attach("eval_after", work / "eval_after.json")
    run.stage("passkey_after", passkey_cmd(run_dir, work / "passkey_after.json", args), timeout=240)
    run.attach("passkey_after", work / "passkey_after.json")
    return 0


def main_passkey(args) -> int:
    """One model's passkey accuracy at several lengths (a stage of the run)."""
    import torch

    from finetune.commands import load_eval_model
    from finetune.passkey import run_passkey

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, _ = load_eval_model(str(args.model), device, None)
    report = {}
    for n in (int(x) for x in args.lengths.split(",")):
        r = run_passkey(model, tokenizer, n, args.trials)
        report[str(n)] = r.to_dict()
        print(f"passkey {n} tokens: {r.correct}/{r.trials} in {r.seconds} s", flush=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    pk = sub.add_parser("passkey", help="passkey accuracy of one model")
    pk.add_argument("--model", type=Path, required=True)
    pk.add_argument("--json", required=True)
    pk.add_argument("--lengths", default="4096,16384,65536")
    pk.add_argument("--trials", type=int, default=10)
    p.add_argument("--gguf", type=Path, help="the bundled SmolLM2 GGUF (converted like the product does)")
    p.add_argument("--model", type=Path, help="an already converted checkpoint instead of --gguf")
    p.add_argument("--train-data", type=Path, help="folder of training repositories (one dir each)")
    p.add_argument("--eval-data", type=Path, help="folder holding the held-out repositories")
    p.add_argument("--eval-repos", default="requests,flask")
    p.add_argument("--distractors", default="click")
    p.add_argument("--heldout-fraction", type=float, default=0.5)
    p.add_argument("--max-windows", type=int, default=12)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--passkey-lengths", default="4096,16384,65536")
    p.add_argument("--passkey-trials", type=int, default=10)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--train-override", "-o", action="append", default=[], help="passed to `longllama train -o`")
    p.add_argument("--out", type=Path, default=Path("bench/results/fot-default"))
    p.add_argument("--work", type=Path, default=Path("/tmp/fot-work"))
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--margin-s", type=float, default=20)
    p.add_argument("--min-train-minutes", type=float, default=0.2)
    p.add_argument("--skip-before", action="store_true")
    p.add_argument("--after-reserve-s", type=float, default=120)
    args = p.parse_args(argv)
    if args.cmd is None and (args.gguf is None) == (args.model is None):
        p.error("give --gguf or --model")
    return args


if __name__ == "__main__":
    a = parse()
    sys.exit(main_passkey(a) if a.cmd == "passkey" else main_run(a))
