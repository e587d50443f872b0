"""FoT crossbatch training (spec §3): the model made trainable, the accelerate loop, checkpoints.
The run config is in config.py, the output formats (full checkpoint, weight delta) in outputs.py.

    cfg = RunConfig.load("finetune/configs/tiny.toml", ["train.steps=20"])
    result = train(cfg)                    # model + data from cfg, everything written to train.out_dir

Global batch and processes. One optimizer step consumes `train.grad_accum` data batches of
`data.batch_size` rows (B). Each data batch is cut into micro-batches of `train.micro_batch_size`
rows, whole packs only, and micro-batch i of the step runs on process i mod W. Crossbatch attention
sees the rows of its own micro-batch, so what is computed does not depend on W:

    data batch B=8, pack 4, micro 4:   [p0 p0 p0 p0 | p1 p1 p1 p1]
    W=1: process 0 runs micro 0, then micro 1 (gradients accumulate)
    W=2: process r runs micro r (DDP or FSDP through `accelerate launch`, no code change)

The loss is the sum of target-token NLLs over the whole step divided by the step's token count
(times W, because DDP averages gradients), so every W gives the one-process gradient exactly.

Gradient checkpointing is the model's non-reentrant one (LongLlamaModel.forward_window): memory
keys/values produced inside a checkpointed layer stay differentiable, unlike the reference recipe
(spec §3.4 "Pitfall"). tests/test_train.py checks the memory layer's v_proj gradients.

Run directory (`train.out_dir`):
    train_config.json      the three config sections + package versions (+ the TOML given)
    metrics.jsonl          one line per logged step {"step", "loss", "lr", "tokens_per_s", ...} and eval
    checkpoints/step-N/    accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    output, by train.output: "full" or "delta" (outputs.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.config import DataArgs, ModelArgs, RunConfig, TrainArgs, write_run_config
from finetune.outputs import layer_of, memory_attention_names, save_output
from longllama_lsp.model.loading import (
    LOW_RANK_DOWN,
    LOW_RANK_UP,
    apply_delta_tensors,
    read_weight_delta,
    split_weight_delta,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Model: load, choose trainable parameters


def load_for_training(margs: ModelArgs, device: str | torch.device = "cpu"):
    """(model in train mode, tokenizer, base checkpoint dir or None) with `margs.train` applied."""
    from longllama_lsp.model import PRESETS, LongLlamaConfig, LongLlamaForCausalLM
    from longllama_lsp.model.loading import (
        apply_weight_delta,
        build_model,
        find_adapter,
        load_config,
        load_tokenizer,
        read_state_dict,
    )
    from longllama_lsp.resolve import resolve_model

    dtype = getattr(torch, margs.dtype)
    seeds: dict[str, dict[str, torch.Tensor]] = {}  # LoRA pairs of a start delta (apply_start_delta)
    if margs.preset is not None:
        if margs.tokenizer is None:
            raise ValueError("model.preset needs model.tokenizer (a tokenizer dir)")
        tokenizer = load_tokenizer(margs.tokenizer)
        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tokenizer, k, None) is not None}
        config = LongLlamaConfig(**{**PRESETS[margs.preset], "vocab_size": len(tokenizer), **ids,
                                    **margs.config_overrides})
        torch.manual_seed(margs.init_seed)
        model, base = LongLlamaForCausalLM(config).to(device=device, dtype=dtype), None
    else:
        base = Path(resolve_model(margs.path, keep_delta=True))
        start_delta = None
        if (base / "adapter.json").is_file() and not (base / "config.json").is_file():
            # A weight delta (an earlier run's output): continue from it, on its base model, so the
            # new delta again applies to that base (training in stages, e.g. a d schedule per run).
            start_delta = base / "adapter.safetensors"
            base = Path(json.loads((base / "adapter.json").read_text())["base_model"])
        config = load_config(base)
        for k, v in margs.config_overrides.items():
            setattr(config, k, v)
        model = build_model(config, read_state_dict(base), device=device, dtype=dtype, source=base)
        if (adapter := find_adapter(base)) is not None:
            apply_weight_delta(model, adapter)
        if start_delta is not None:
            seeds = apply_start_delta(model, read_weight_delta(start_delta), str(start_delta), margs)
        tokenizer = load_tokenizer(margs.tokenizer or base)
    return prepare_trainable(model, margs, seeds), tokenizer, base


def apply_start_delta(model, delta: dict[str, torch.Tensor], source: str, margs: ModelArgs
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """Apply an earlier run's delta to start from; returns the low-rank pairs a LoRA run continues as
    its adapters' start (not applied here). Merged, they would differ from the base, so the new delta
    would hold every one of them as a full replacement (~400 MB instead of ~30 MB on SmolLM2)."""
    _, low_rank = split_weight_delta(delta)
    seeds = {}
    if margs.train == "lora":
        wrapped = {f"{n}.weight" for n in lora_module_names(model, margs)}
        seeds = {name: pair for name, pair in low_rank.items() if name in wrapped and len(pair) == 2
                 and pair[LOW_RANK_DOWN].shape[0] == margs.lora_r}
    apply_delta_tensors(model, delta, source, keep_pairs=seeds.keys())  # checks the seeds' shapes too
    return seeds


def lora_module_names(model, margs: ModelArgs) -> list[str]:
    """Full module names LoRA wraps: `lora_targets` of `lora_layers`."""
    if margs.lora_layers == "memory":
        layers = set(model.config.mem_layers)
    elif margs.lora_layers == "all":
        layers = set(range(model.config.num_hidden_layers))
    else:
        layers = {int(i) for i in margs.lora_layers}
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and layer_of(n) in layers
             and n.rsplit(".", 1)[-1] in margs.lora_targets]
    if not names:
        raise ValueError(f"LoRA targets {margs.lora_targets} match no linear layer in layers {sorted(layers)}")
    return names


def prepare_trainable(model, margs: ModelArgs, seeds: dict[str, dict[str, torch.Tensor]] | None = None):
    """Freeze what `margs.train` does not train; wrap in PEFT LoRA for 'lora', its adapters starting at
    `seeds` (low-rank pairs by weight name, from `apply_start_delta`). Returns the model to train."""
    from longllama_lsp.model import LongLlamaModel

    if margs.gradient_checkpointing:
        for m in model.modules():
            if isinstance(m, LongLlamaModel):
                m.gradient_checkpointing = True  # forward_window checkpoints non-reentrantly
    if margs.train == "all":
        model.requires_grad_(True)
    elif margs.train == "memory":
        keep = set(memory_attention_names(model))
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
    else:
        from peft import LoraConfig, get_peft_model

        targets = lora_module_names(model, margs)
        torch.manual_seed(margs.init_seed)  # lora_A starts random: the same run must start the same
        model = get_peft_model(model, LoraConfig(r=margs.lora_r, lora_alpha=margs.lora_alpha,
                                                 lora_dropout=margs.lora_dropout, target_modules=targets))
        seed_lora(model, seeds or {})
    return model.train()


def seed_lora(peft_model, seeds: dict[str, dict[str, torch.Tensor]]) -> None:
    """Start each adapter at a low-rank pair: A = down (r, in), B = up / scale (out, r), so that
    B @ A * scale = up @ down, the increment the pair stood for."""
    for name, pair in seeds.items():
        layer = peft_model.base_model.model.get_submodule(name.removesuffix(".weight"))
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(pair[LOW_RANK_DOWN].to(a.dtype))
            b.copy_((pair[LOW_RANK_UP].float() / layer.scaling["default"]).to(b.dtype))


# ---------------------------------------------------------------------------------------------
# Loss


def batch_nll(model, batch: dict[str, torch.Tensor], crossbatch) -> torch.Tensor:
    """Sum over rows and positions of loss_mask · NLL(target_ids) (the reference loss, unnormalized)."""
    device = next(p.device for p in model.parameters())
    out = model(batch["input_ids"].to(device), crossbatch=crossbatch)
    logits = out.logits.float()  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target_ids"].to(device).flatten(),
                                            reduction="none")
    return (nll * batch["loss_mask"].to(device).flatten().float()).sum()


def micro_batches(batches: list[dict[str, Any]], micro: int) -> list[dict[str, torch.Tensor]]:
    """Cut (B, T) data batches into row slices of `micro` rows (whole packs, checked by the caller)."""
    keys = ("input_ids", "target_ids", "loss_mask")
    return [{k: b[k][i:i + micro] for k in keys} for b in batches for i in range(0, b["input_ids"].shape[0], micro)]


def resolve_micro(targs: TrainArgs, data: DataArgs, world: int) -> int:
    micro = targs.micro_batch_size or data.batch_size // world
    total = targs.grad_accum * data.batch_size
    if micro < 1 or micro % data.pack or data.batch_size % micro or (total // micro) % world:
        raise ValueError(
            f"micro_batch_size {micro} must be a multiple of data.pack ({data.pack}) dividing data.batch_size "
            f"({data.batch_size}), and the {total // max(micro, 1)} micro-batches per step must split evenly over "
            f"{world} processes: set train.micro_batch_size / train.grad_accum")
    return micro


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done (including resumed ones)
    losses: dict[int, float]  # step -> training loss, this invocation's steps
    evals: list[dict[str, float]]
    stopped: str  # "steps" | "time"
    tokens: int
    elapsed_s: float
    model: Any = None  # the trained model (unwrapped; PEFT model for LoRA)
    prepared: Any = None  # as accelerate wrapped it (DDP/FSDP), for trained_state_dict
    output: Path | None = None


def make_accelerator(targs: TrainArgs):
    from accelerate import Accelerator

    # step_scheduler_with_optimizer=False: accelerate would otherwise step the LR schedule once per
    # process, making the curve depend on the number of processes.
    return Accelerator(mixed_precision=targs.mixed_precision, cpu=targs.cpu, step_scheduler_with_optimizer=False)


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


def train_loop(model, batches: Callable[[], Iterator[dict[str, Any]]], cfg: RunConfig, accelerator=None,
               eval_batches: list[dict[str, Any]] | None = None) -> TrainResult:
    """Train `model` (parameters already chosen) on `batches()` — a fresh, deterministic stream of
    FoT batch dicts (input_ids, target_ids, loss_mask: (B, T)); resuming skips what was consumed."""
    from tqdm.auto import tqdm

    t, data = cfg.train, cfg.data
    acc = accelerator or make_accelerator(t)
    world, rank = acc.num_processes, acc.process_index
    micro = resolve_micro(t, data, world)
    run_dir = Path(t.out_dir)
    from accelerate.utils import set_seed

    set_seed(t.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    opt = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t.warmup_steps))
    model, opt, sched = acc.prepare(model, opt, sched)

    state = {"step": 0, "batches": 0, "tokens": 0, "elapsed_s": 0.0}
    if t.resume:
        ckpt = find_checkpoint(run_dir, t.resume)
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        logger.info("resumed from %s at step %d", ckpt, state["step"])
    if acc.is_main_process:
        write_run_config(cfg, run_dir, {"processes": world, "micro_batch_size": micro})
        _trim_metrics(run_dir / "metrics.jsonl", state["step"])
        if not t.resume:  # a fresh run owns its run dir: stale checkpoints would confuse resume="latest"
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    acc.wait_for_everyone()
    stream = batches()
    for _ in range(state["batches"]):  # data position: the stream is deterministic, replay it
        next(stream)

    losses: dict[int, float] = {}
    evals: list[dict[str, float]] = []
    stopped = "steps"
    start = time.perf_counter() - state["elapsed_s"]
    bar = tqdm(total=t.steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
               disable=not (t.progress and acc.is_main_process), file=sys.stderr)
    while state["step"] < t.steps:
        if t.max_minutes is not None and time.perf_counter() - start > 60 * t.max_minutes:
            stopped = "time"
            break
        t0 = time.perf_counter()
        step_batches = [next(stream) for _ in range(t.grad_accum)]
        state["batches"] += t.grad_accum
        cb = data.crossbatch_at(state["step"])
        lr = sched.get_last_lr()[0]  # the LR this step uses
        loss, n_tok = _step(model, acc, opt, sched, micro_batches(step_batches, micro), cb, world, rank,
                            t.max_grad_norm)
        state["step"] += 1
        step_tokens = sum(int(b["input_ids"].numel()) for b in step_batches)
        state["tokens"] += step_tokens
        state["elapsed_s"] = time.perf_counter() - start
        losses[state["step"]] = loss
        tok_s = step_tokens / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}")
        if acc.is_main_process and (state["step"] % t.log_every == 0 or state["step"] == t.steps):
            _log(run_dir, {"step": state["step"], "loss": loss, "ppl": _ppl(loss), "lr": lr,
                           "range": cb.range, "target_tokens": n_tok, "tokens": state["tokens"],
                           "tokens_per_s": round(tok_s, 1), "elapsed_s": round(state["elapsed_s"], 3)})
        last = state["step"] == t.steps
        if eval_batches and t.eval_batches and ((t.eval_every and state["step"] % t.eval_every == 0) or last):
            evals.append(_evaluate(model, acc, eval_batches, micro, data, state["step"], world, rank, run_dir))
        if t.save_every and (state["step"] % t.save_every == 0 or last):
            save_checkpoint(acc, run_dir, state, t.keep_checkpoints)
    bar.close()
    if stopped == "time" and eval_batches and t.eval_batches and (not evals or evals[-1]["step"] != state["step"]):
        evals.append(_evaluate(model, acc, eval_batches, micro, data, state["step"], world, rank, run_dir))
    if stopped == "time" and t.save_every:
        save_checkpoint(acc, run_dir, state, t.keep_checkpoints)
    return TrainResult(run_dir, state["step"], losses, evals, stopped, state["tokens"], state["elapsed_s"],
                       model=acc.unwrap_model(model), prepared=model)


def _step(model, acc, opt, sched, micros, cb, world, rank, max_grad_norm) -> tuple[float, int]:
    """One optimizer step over this process's share of the micro-batches. Returns (global loss, tokens)."""
    n_tok = int(sum(int(m["loss_mask"].sum()) for m in micros))
    mine = micros[rank::world]
    local = torch.zeros((), dtype=torch.float64, device=acc.device)
    for j, mb in enumerate(mine):
        sync = j == len(mine) - 1
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            nll = batch_nll(model, mb, cb)
            acc.backward(nll * (world / max(n_tok, 1)))
        local += nll.detach().double()
    if max_grad_norm:
        acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    total = acc.reduce(local, reduction="sum")
    return float(total) / max(n_tok, 1), n_tok


@torch.no_grad()
def _evaluate(model, acc, eval_batches, micro, data: DataArgs, step, world, rank, run_dir) -> dict[str, float]:
    """Held-out loss with the current crossbatch setting and without crossbatch (range 0)."""
    from longllama_lsp.model.crossbatch import CrossBatch

    was_training = model.training
    model.eval()
    micros = micro_batches(eval_batches, micro)
    n_tok = int(sum(int(m["loss_mask"].sum()) for m in micros))
    out = {"step": step}
    for name, cb in (("eval", data.crossbatch_at(step)), ("eval_nomem", CrossBatch(0, data.pack, data.stepping))):
        local = torch.zeros((), dtype=torch.float64, device=acc.device)
        for mb in micros[rank::world]:
            local += batch_nll(model, mb, cb).double()
        loss = float(acc.reduce(local, reduction="sum")) / max(n_tok, 1)
        out[f"{name}_loss"], out[f"{name}_ppl"] = loss, _ppl(loss)
    model.train(was_training)
    if acc.is_main_process:
        _log(run_dir, out)
    return out


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (a fresh run: all of them), so a resumed curve has no duplicates."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep) if step else "")


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(acc, run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """accelerate state (model, optimizer, scheduler, RNG of every process) + the data position."""
    ckpt = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    acc.save_state(str(ckpt), safe_serialization=False)  # pickled tensors: tied weights need no care
    if acc.is_main_process:
        (ckpt / "trainer_state.json").write_text(json.dumps(state) + "\n")
        for old in sorted((run_dir / "checkpoints").glob("step-*"))[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return ckpt


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    if resume != "latest":
        ckpt = Path(resume)
    else:
        found = sorted((run_dir / "checkpoints").glob("step-*"))
        if not found:
            raise FileNotFoundError(f"no checkpoint to resume in {run_dir / 'checkpoints'}")
        ckpt = found[-1]
    if not (ckpt / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a training checkpoint (no trainer_state.json)")
    return ckpt


# ---------------------------------------------------------------------------------------------
# From a config: data, held-out split, loop, output


def split_sources(data: DataArgs, fraction: float, seed: int) -> tuple[set[str] | None, set[str]]:
    """(train paths or None = all, held-out paths) over all local source roots."""
    from finetune.data import resolve_sources, split_repo_files

    if fraction <= 0:
        return None, set()
    train_paths: set[str] = set()
    held: set[str] = set()
    for root in resolve_sources(data):
        tr, he = split_repo_files(root, fraction, seed)
        train_paths.update(tr)
        held.update(he)
    return train_paths - held, held


def heldout_batches(data: DataArgs, tokenizer, held: set[str], n: int) -> list[dict[str, Any]]:
    """`n` fixed batches from the held-out files (documents as short as one row allowed)."""
    from finetune.data import fot_batches

    if not held or n <= 0:
        return []
    eval_data = dataclasses.replace(data, min_doc_tokens=min(data.min_doc_tokens, data.seq_len + 1),
                                    hf_datasets=[])
    try:
        stream = fot_batches(eval_data, tokenizer, only=held)
        return [next(stream) for _ in range(n)]
    except ValueError as e:
        logger.warning("no held-out evaluation: %s", e)
        return []


def train(cfg: RunConfig, accelerator=None) -> TrainResult:
    """Load model and data from `cfg`, train, write the output. The `longllama train` command."""
    from finetune.data import fot_batches

    acc = accelerator or make_accelerator(cfg.train)
    model, tokenizer, base = load_for_training(cfg.model, device=acc.device)
    window = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.max_position_embeddings
    if cfg.data.seq_len > window:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} exceeds the model window {window}")
    train_paths, held = split_sources(cfg.data, cfg.train.heldout_fraction, cfg.train.seed)
    evals = heldout_batches(cfg.data, tokenizer, held, cfg.train.eval_batches)
    result = train_loop(model, lambda: fot_batches(cfg.data, tokenizer, only=train_paths), cfg, acc, evals)
    result.output = save_output(result.prepared, tokenizer, cfg, Path(cfg.train.out_dir), base, cfg.train.output,
                                acc=acc)
    acc.wait_for_everyone()
    return result
