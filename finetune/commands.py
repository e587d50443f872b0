"""`longllama finetune`, `longllama train`, `longllama eval`: thin CLI layers over finetune.train and
finetune.evaluate (imported lazily by longllama_lsp.cli)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from longllama_lsp.cli import Command, add_model_arguments, add_repository_argument

logger = logging.getLogger(__name__)


def _device(name: str | None) -> str:
    from longllama_lsp.load import resolve_device_dtype

    return resolve_device_dtype(name)[0]


def _mixed_precision(dtype: str | None, device: str) -> str:
    if dtype is None:
        return "bf16" if device.startswith("cuda") else "no"
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[dtype]


def load_eval_model(path: str | None, device: str, dtype: str | None):
    """(model, tokenizer, model dir) for evaluation: a checkpoint, or a training delta dir (adapter.json)."""
    from finetune.outputs import load_trained
    from longllama_lsp.load import resolve_device_dtype
    from longllama_lsp.resolve import resolve_model

    model_dir = Path(resolve_model(path))
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model, tokenizer = load_trained(model_dir, device, torch_dtype)
    return model.eval(), tokenizer, model_dir


# ---------------------------------------------------------------------------------------------
# longllama finetune


FINETUNE_HELP = """\
FoT-train the memory layers on your repository, then compare held-out perplexity:
  (a) without memory, (b) with repository memory before training, (c) with it after training;
memory as completions read it: the chunks retrieved for the code before each window (4,096 tokens).
The result is kept only if it helps: (c) at least --min-gain percent below (b) (repository memory
predicts your held-out files better after training than before, by more than a rounding's worth), and
(a) after training at most --max-forgetting percent above (a) before (the memory layers also attend
locally: what they learn must not cost completions without memory). It is written to --out as a weight delta
(adapter.safetensors + adapter.json, applied on the base model) or with --full as a checkpoint.
Whether memory beats no memory at all ((c) vs (a)) is reported too. Use the result anywhere a model
goes: `longllama serve --model OUT` (complete, ask, index too), LONGLLAMA_MODEL=OUT, or the editors'
model.path setting; `longllama finetune --model OUT` trains it further."""


MEMORY = "retrieved"  # the evaluate condition `finetune` judges memory by


def _finetune_args(p: argparse.ArgumentParser) -> None:
    add_repository_argument(p, "repository to train on")
    add_model_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="output directory (model delta, report, metrics)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the memory layers' attention "
                   "(kept as low-rank pairs in the delta) instead of the memory layers' q/k/v/o weights")
    p.add_argument("--all", dest="train_all", action="store_true", help="train every parameter (implies --full)")
    p.add_argument("--full", action="store_true", help="write a full checkpoint instead of a weight delta")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget (default: 10); the held-out "
                   "evaluations before and after training add to it")
    p.add_argument("--steps", type=int, default=1000, help="maximum optimizer steps (default: 1000)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 5e-5, LoRA 2e-4)")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps, then constant LR (default: 10)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per batch row, <= model window (default: 512)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch, whole packs of 4 (default: 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default: 1)")
    p.add_argument("--range", dest="cross_batch_range", type=int, default=3,
                   help="crossbatch range R: contexts each memory-layer row also sees (default: 3)")
    p.add_argument("--window", type=int, default=512, help="evaluation window (default: 512)")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="files held out (default: 0.1)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluation windows per held-out file")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--min-gain", type=float, default=1.0, metavar="PCT",
                   help="keep the result only if perplexity with memory drops by at least PCT percent (default: 1)")
    p.add_argument("--max-forgetting", type=float, default=1.0, metavar="PCT",
                   help="... and perplexity without memory rises by at most PCT percent (default: 1)")
    p.add_argument("--keep-always", action="store_true", help="write the model even when it does not help")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run_finetune(args: argparse.Namespace) -> int:
    from finetune.config import DataArgs, ModelArgs, RunConfig, TrainArgs
    from finetune.data import fot_batches, split_repo_files
    from finetune.evaluate import EvalArgs, evaluate, load_repo
    from finetune.outputs import save_output
    from finetune.train import load_for_training, train_loop

    device = _device(args.device)
    mode = "all" if args.train_all else "lora" if args.lora else "memory"
    margs = ModelArgs(path=args.model, train=mode, gradient_checkpointing=args.gradient_checkpointing)
    model, tokenizer, base = load_for_training(margs, device)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    window = min(args.window, core.window)
    train_paths, held = split_repo_files(args.repo, args.heldout_fraction, args.seed)
    # Memory judged as completions read it: the chunks retrieved for the code before each window (not all of
    # the repository in dense attention: that cost 13 minutes per judgement on requests and is not what
    # the server reads).
    eargs = EvalArgs(window=window, conditions=("none", MEMORY), seed=args.seed, max_windows=args.max_windows)
    repo = load_repo(args.repo, tokenizer, eargs, heldout=held)
    if not repo.heldout:
        print("longllama finetune: the repository needs at least 2 text files (one is held out)", file=sys.stderr)
        return 1
    print(f"repository {repo.name}: {len(repo.files)} files, {repo.tokens} tokens; "
          f"held out {len(repo.heldout)} file{'s' if len(repo.heldout) != 1 else ''}: {', '.join(repo.heldout[:5])}{' ...' if len(repo.heldout) > 5 else ''}",
          file=sys.stderr)

    print("held-out perplexity before training ...", file=sys.stderr)
    before = evaluate(core, [repo], eargs, progress=args.progress, tokenizer=tokenizer)
    seq_len = min(args.seq_len, core.window)
    data = DataArgs(sources=[str(args.repo)], seq_len=seq_len, batch_size=args.batch_size, pack=4,
                    cross_batch_range=args.cross_batch_range, min_doc_tokens=0, seed=args.seed)
    lr = args.lr or (2e-4 if mode == "lora" else 5e-5)
    targs = TrainArgs(out_dir=str(args.out), steps=args.steps, max_minutes=args.minutes, lr=lr,
                      warmup_steps=args.warmup, grad_accum=args.grad_accum, output="none", eval_batches=0,
                      mixed_precision=_mixed_precision(args.dtype, device), seed=args.seed, progress=args.progress,
                      cpu=device == "cpu")
    cfg = RunConfig(model=margs, data=data, train=targs)
    only = set(train_paths) - set(repo.heldout)
    core.train()
    result = train_loop(model, lambda: fot_batches(data, tokenizer, only=only), cfg)
    trained = result.model.get_base_model() if hasattr(result.model, "get_base_model") else result.model
    print("held-out perplexity after training ...", file=sys.stderr)
    after = evaluate(trained, [repo], eargs, progress=args.progress, tokenizer=tokenizer)

    summary = _finetune_summary(before, after, result, args.min_gain, args.max_forgetting)
    keep = summary["helps"] or args.keep_always
    if keep:
        kind = "full" if args.full or mode == "all" else "delta"
        save_output(result.model, tokenizer, cfg, args.out, base, kind, extra={"finetune": summary})
        summary["saved"] = kind
    (args.out / "finetune_report.json").write_text(json.dumps(
        {**summary, "before": before.to_dict(), "after": after.to_dict()}, indent=2) + "\n")
    print(_finetune_table(summary, args.out, keep))
    return 0


def _finetune_summary(before, after, result, min_gain: float, max_forgetting: float) -> dict[str, Any]:
    s = {"no_memory_before": before.ppl("none"), "memory_before": before.ppl(MEMORY),
         "no_memory_after": after.ppl("none"), "memory_after": after.ppl(MEMORY), "memory": MEMORY,
         "heldout_files": [f.path for f in before.files], "heldout_tokens": sum(f.tokens for f in before.files),
         "repo_memory_tokens": max((f.memory_tokens.get(MEMORY, 0) for f in before.files), default=0),
         "steps": result.step, "stopped": result.stopped, "train_tokens": result.tokens,
         "train_seconds": round(result.elapsed_s, 1), "final_loss": result.losses.get(result.step)}
    s["memory_gain_pct"] = _drop_pct(s["memory_before"], s["memory_after"])
    s["forgetting_pct"] = -_drop_pct(s["no_memory_before"], s["no_memory_after"])
    s["min_gain_pct"], s["max_forgetting_pct"] = min_gain, max_forgetting
    # A gain of a few thousandths is one held-out file's noise, not something worth serving.
    s["gains"] = bool(s["memory_gain_pct"] >= min_gain)
    s["forgets"] = bool(s["forgetting_pct"] > max_forgetting)
    s["helps"] = s["gains"] and not s["forgets"]
    s["memory_beats_none"] = bool(s["memory_after"] is not None and s["no_memory_after"] is not None
                                  and s["memory_after"] < s["no_memory_after"])
    return s


def _drop_pct(before: float | None, after: float | None) -> float:
    """How much lower `after` is than `before`, in percent (-inf when either is missing or not finite)."""
    if before is None or after is None or not math.isfinite(before) or not math.isfinite(after):
        return -math.inf
    return 100.0 * (before - after) / before


def _finetune_table(s: dict[str, Any], out: Path, keep: bool) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None or math.isnan(x) else f"{x:.3f}"

    lines = [
        f"held-out perplexity: {len(s['heldout_files'])} files, {s['heldout_tokens']} tokens; "
        f"repository memory: up to {s['repo_memory_tokens']} tokens retrieved per window, as completions read "
        f"it; trained {s['steps']} steps "
        f"({s['train_seconds']} s, {s['train_tokens']} tokens, stopped by {s['stopped']})",
        "",
        "                              before training   after training",
        f"(a) no memory                 {f(s['no_memory_before']):>15}   {f(s['no_memory_after']):>14}",
        f"(b)/(c) repository memory     {f(s['memory_before']):>15}   {f(s['memory_after']):>14}",
        "",
    ]
    gain = (f"with memory {f(s['memory_after'])} after, {f(s['memory_before'])} before "
            f"({-s['memory_gain_pct']:+.1f}%)")
    if not s["gains"]:
        lines.append(f"does not help: {gain}, not the --min-gain of {s['min_gain_pct']:g}% lower")
        if s["memory_gain_pct"] > 0:
            lines.append("  train longer (--minutes), or keep a smaller gain with --min-gain / --keep-always")
    elif s["forgets"]:
        lines.append(f"does not help: {gain}, but without memory {f(s['no_memory_after'])} after, "
                     f"{f(s['no_memory_before'])} before ({s['forgetting_pct']:+.1f}%, more than the "
                     f"--max-forgetting of {s['max_forgetting_pct']:g}%)")
    else:
        lines.append(f"helps: {gain}")
    lines.append(f"{'kept' if keep else 'discarded'}: " + (f"{s.get('saved')} written to {out}" if keep else
                 f"nothing written but the report ({out / 'finetune_report.json'})"))
    if keep:
        lines.append(f"use it: longllama serve --model {out} (also complete, ask, index), or set the "
                     f"editor's model.path (or LONGLLAMA_MODEL) to {out}")
    if not s["memory_beats_none"]:
        lines.append(f"note: memory still does not beat no memory after training ({f(s['memory_after'])} vs "
                     f"{f(s['no_memory_after'])}); consider more training or completions without memory")
    return "\n".join(lines)


finetune = Command(_finetune_args, run_finetune, FINETUNE_HELP)


# ---------------------------------------------------------------------------------------------
# longllama train


TRAIN_HELP = """\
FoT crossbatch training from a TOML config with [model], [data] and [train] tables
(finetune/configs/*.toml; fields: finetune.config.ModelArgs / TrainArgs / DataArgs).
Multi-GPU / multi-node: `accelerate launch [--multi_gpu|--use_fsdp ...] -m longllama_lsp.cli train CONFIG`.
A config with a [retrieval] table (finetune/configs/retrieval-*.toml) trains retrieval instead:
memory encoded per chunk as at inference, examples from local code (finetune/retrieval_train.py)."""


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="TOML config")
    p.add_argument("--override", "-o", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (TOML syntax; repeatable), e.g. -o train.lr=1e-4")
    p.add_argument("--out", help="shortcut for -o train.out_dir=OUT")
    p.add_argument("--steps", type=int, help="shortcut for -o train.steps=N")
    p.add_argument("--model", help="shortcut for -o model.path=PATH")
    p.add_argument("--resume", nargs="?", const="latest", help="resume from the latest (or the given) checkpoint")


def run_train(args: argparse.Namespace) -> int:
    from finetune.config import RunConfig
    from finetune.train import train

    overrides = list(args.override)
    for key, value in (("train.out_dir", args.out), ("train.steps", args.steps), ("model.path", args.model),
                       ("train.resume", args.resume)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    from finetune.retrieval_train import is_retrieval_recipe

    if is_retrieval_recipe(args.config):  # a [retrieval] table: memory built per chunk (issue 16)
        from finetune.retrieval_train import run

        return run(args.config, overrides)
    cfg = RunConfig.load(args.config, overrides)
    result = train(cfg)
    last = result.losses.get(result.step)
    ev = result.evals[-1] if result.evals else {}
    msg = (f"trained {result.step} steps ({result.stopped}), {result.tokens} tokens in {result.elapsed_s:.1f} s; "
           f"loss {last:.4f}" if last is not None else f"trained {result.step} steps")
    if ev:
        msg += f"; held-out ppl {ev['eval_ppl']:.3f} (no crossbatch {ev['eval_nomem_ppl']:.3f})"
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(msg + f"\nrun dir: {result.run_dir}" + (f"\noutput: {result.output}" if result.output else ""))
    return 0


train = Command(_train_args, run_train, TRAIN_HELP)


# ---------------------------------------------------------------------------------------------
# longllama eval


EVAL_HELP = """\
Perplexity of held-out files in windows (local context = the window) with: no memory; the file's
own earlier windows; the other files of its repository; the latter plus N x as many tokens of
unrelated repositories (distractors: the other --repo's, or --distractors-from); with
--conditions ...,retrieved also the memory completions read (the chunks retrieved for the code
before each window).
--task crossfile-ids|passkey|guard|skill measures retrieval instead (finetune/skill_eval.py)."""


def _eval_args(p: argparse.ArgumentParser) -> None:
    add_repository_argument(p, "repository to evaluate on", repeat=True, required=False)
    add_model_arguments(p)
    from finetune.skill_args import add_arguments

    add_arguments(p)  # --task: the retrieval-skill measurements (issue 16)
    p.add_argument("--heldout", action="append", default=None, metavar="PATH",
                   help="held-out file relative to its repository (repeatable; default: a seeded split)")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--distractors-from", action="append", default=[], metavar="DIR",
                   help="unrelated repositories used only as distractor memory (repeatable)")
    p.add_argument("--distractor-ratio", type=float, default=2.0, help="distractor tokens per repository token")
    p.add_argument("--conditions", default="none,own,repo,distract",
                   help="comma-separated subset of none,own,repo,distract,retrieved (retrieved: the chunks "
                        "completions would read for the code before each window, up to 4,096 tokens)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-files", type=int, default=None, help="held-out files per repository")
    p.add_argument("--max-windows", type=int, default=None, help="windows scored per file")
    p.add_argument("--languages", default=None, help="comma-separated suffixes, e.g. .py,.ts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write the JSON report ('-' = stdout only)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run_eval(args: argparse.Namespace) -> int:
    from finetune.evaluate import EvalArgs, evaluate, load_repo

    if args.task != "perplexity":
        from finetune.skill_eval import run

        return run(args)
    if not args.repo:
        print("longllama eval: give at least one --repo", file=sys.stderr)
        return 2

    device = _device(args.device)
    model, tokenizer, model_dir = load_eval_model(args.model, device, args.dtype)
    eargs = EvalArgs(window=min(args.window, model.window), conditions=tuple(args.conditions.split(",")),
                     distractor_ratio=args.distractor_ratio, batch_size=args.batch_size,
                     heldout_fraction=args.heldout_fraction, seed=args.seed, max_files=args.max_files,
                     max_windows=args.max_windows,
                     languages=args.languages.split(",") if args.languages else None)
    repos = [load_repo(r, tokenizer, eargs, heldout=args.heldout) for r in args.repo]
    extra = [load_repo(r, tokenizer, eargs, heldout=[]) for r in args.distractors_from]
    _unique_names(repos + extra)
    report = evaluate(model, repos, eargs, extra, progress=args.progress, tokenizer=tokenizer)
    report.meta["model"] = str(model_dir)
    if args.json_out == "-":
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(report.table())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _unique_names(repos) -> None:
    seen: dict[str, int] = {}
    for r in repos:
        n = seen.get(r.name, 0)
        seen[r.name] = n + 1
        if n:
            r.name = f"{r.name}#{n + 1}"


evaluate = Command(_eval_args, run_eval, EVAL_HELP)
