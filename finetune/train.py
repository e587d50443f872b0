"""FoT crossbatch training (spec §3): run config, the accelerate loop, checkpoints, outputs.

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
    output, by train.output: "full" = config.json + model.safetensors + tokenizer (load by path);
                             "delta" = adapter.safetensors + adapter.json (only the trained tensors,
                             LoRA merged; applied on the base model named by its fingerprint)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import tomllib
import torch

from finetune.config import DataArgs

logger = logging.getLogger(__name__)

TRAIN_MODES = ("all", "memory", "lora")
OUTPUTS = ("auto", "full", "delta", "none")
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
DELTA_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    """Which model to train and which of its parameters."""

    path: str | None = None  # checkpoint dir; None = resolve_model() (the bundled SmolLM2 LongLLaMA)
    preset: str | None = None  # instead of path: random init from PRESETS[preset] (toys, tests)
    tokenizer: str | None = None  # tokenizer dir for `preset` (default: path)
    # LongLlamaConfig fields set before the model is built, e.g. {max_position_embeddings = 64}.
    config_overrides: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0  # weights of a `preset` model
    dtype: str = "float32"  # master weights; bf16 compute is train.mixed_precision
    train: str = "memory"  # all | memory (q,k,v,o of mem_layers: FoT adds no parameters) | lora
    lora_r: int = 16
    lora_alpha: float = 32.0  # LoRA scale = alpha / r
    lora_dropout: float = 0.0  # > 0 makes runs depend on the RNG (restored on resume)
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_PROJ))
    lora_layers: str | list[int] = "memory"  # "memory", "all", or layer indices
    gradient_checkpointing: bool = False  # non-reentrant: memory K/V stay differentiable

    def __post_init__(self):
        if self.train not in TRAIN_MODES:
            raise ValueError(f"model.train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.path is not None and self.preset is not None:
            raise ValueError("give model.path or model.preset, not both")
        if isinstance(self.lora_layers, str) and self.lora_layers not in ("memory", "all"):
            raise ValueError(f"model.lora_layers must be 'memory', 'all' or a list of layers, got {self.lora_layers!r}")


@dataclass
class TrainArgs:
    """Optimization, logging and checkpointing. Defaults: the paper's constant LR after warmup."""

    out_dir: str = "runs/fot"
    steps: int = 100  # optimizer steps
    max_minutes: float | None = None  # stop after the step that crosses this wall-clock budget
    lr: float = 2e-5  # LongLLaMA-3B FoT: constant 2e-5 (spec §3.3)
    warmup_steps: int = 0  # linear warmup from 0, then constant
    weight_decay: float = 0.01  # spec §3.3
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1  # data batches per optimizer step (over all processes)
    micro_batch_size: int | None = None  # rows per forward, a multiple of data.pack; None = B / processes
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate autocast)
    cpu: bool = False  # force CPU even when CUDA is present
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # held-out loss every N steps (and at the end); 0 = only at the end
    eval_batches: int = 2  # held-out data batches per evaluation; 0 = no evaluation
    heldout_fraction: float = 0.05  # files per source kept out of training for that evaluation
    save_every: int = 0  # checkpoint every N steps (and at the end when > 0)
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint dir
    output: str = "auto"  # auto (delta unless train=all) | full | delta | none
    progress: bool = True  # tqdm bar on stderr

    def __post_init__(self):
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # TOML gives a list
        if self.output not in OUTPUTS:
            raise ValueError(f"train.output must be one of {OUTPUTS}, got {self.output!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.steps < 0 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError("train.steps >= 0, train.grad_accum >= 1 and train.warmup_steps >= 0 required")


def _section(cls, d: dict[str, Any], name: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown [{name}] keys {unknown}; expected some of {sorted(known)}")
    return cls(**d)


@dataclass
class RunConfig:
    """The `[model]`, `[data]` and `[train]` tables of a training TOML."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    source_toml: str | None = None  # the TOML text it was loaded from, kept in the run dir

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(d) - {"model", "data", "train"})
        if unknown:
            raise ValueError(f"unknown config tables {unknown}; expected [model], [data], [train]")
        return cls(model=_section(ModelArgs, d.get("model", {}), "model"),
                   data=DataArgs.from_dict(d.get("data", {})),
                   train=_section(TrainArgs, d.get("train", {}), "train"))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
        """From a TOML file (or defaults when None), then `section.key=value` overrides (TOML values)."""
        text = Path(path).read_text(encoding="utf-8") if path is not None else ""
        d = tomllib.loads(text)
        for item in overrides:
            apply_override(d, item)
        cfg = cls.from_dict(d)
        cfg.source_toml = text or None
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "data": self.data.to_dict(),
                "train": dataclasses.asdict(self.train)}


def apply_override(d: dict[str, Any], item: str) -> None:
    """`train.lr=1e-4`, `data.sources=["a", "b"]`, `model.path=/x` (bare strings need no quotes)."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2:
        raise ValueError(f"override {item!r} is not section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "peft", "safetensors", "tokenizers", "longllama-lsp"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cuda"] = str(torch.version.cuda)
    return out


def write_run_config(cfg: RunConfig, run_dir: Path, extra: dict[str, Any] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    d = {**cfg.to_dict(), "versions": package_versions(), "argv": sys.argv, **(extra or {})}
    (run_dir / "train_config.json").write_text(json.dumps(d, indent=2, default=str) + "\n")
    if cfg.source_toml:
        (run_dir / "train_config.toml").write_text(cfg.source_toml)


# ---------------------------------------------------------------------------------------------
# Model: load, choose trainable parameters


def resolve_model_path(explicit: str | None) -> Path:
    """`explicit`, else the project default (longllama_lsp.resolve, when present)."""
    try:
        from longllama_lsp.resolve import resolve_model
    except ImportError:
        resolve_model = None
    if resolve_model is not None:
        return Path(resolve_model(explicit))
    if explicit is None:
        from longllama_lsp.errors import ModelError

        raise ModelError("no model given: pass --model PATH (model.path in the config)")
    return Path(explicit)


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

    dtype = getattr(torch, margs.dtype)
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
        base = resolve_model_path(margs.path)
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
        for adapter in (find_adapter(base), start_delta):
            if adapter is not None:
                apply_weight_delta(model, adapter)
        tokenizer = load_tokenizer(margs.tokenizer or base)
    return prepare_trainable(model, margs), tokenizer, base


def memory_attention_names(model) -> list[str]:
    """Parameter names of q/k/v/o of the memory layers (what FoT trains; it adds no parameters)."""
    layers = set(model.config.mem_layers)
    if not layers:
        raise ValueError("model.train = 'memory' needs a model with memory layers (mem_layers is empty)")
    return [n for n, _ in model.named_parameters()
            if _layer_of(n) in layers and any(f"self_attn.{p}." in n for p in ATTENTION_PROJ)]


def lora_module_names(model, margs: ModelArgs) -> list[str]:
    """Full module names LoRA wraps: `lora_targets` of `lora_layers`."""
    if margs.lora_layers == "memory":
        layers = set(model.config.mem_layers)
    elif margs.lora_layers == "all":
        layers = set(range(model.config.num_hidden_layers))
    else:
        layers = {int(i) for i in margs.lora_layers}
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _layer_of(n) in layers
             and n.rsplit(".", 1)[-1] in margs.lora_targets]
    if not names:
        raise ValueError(f"LoRA targets {margs.lora_targets} match no linear layer in layers {sorted(layers)}")
    return names


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def prepare_trainable(model, margs: ModelArgs):
    """Freeze what `margs.train` does not train; wrap in PEFT LoRA for 'lora'. Returns the model to train."""
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
        model = get_peft_model(model, LoraConfig(r=margs.lora_r, lora_alpha=margs.lora_alpha,
                                                 lora_dropout=margs.lora_dropout, target_modules=targets))
    return model.train()


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
# Outputs


def trained_state_dict(model, acc=None) -> dict[str, torch.Tensor]:
    """Full state dict with base-model names; LoRA merged (W + B·A·alpha/r).

    `model` as prepared by `acc` (gathered from FSDP shards by accelerate) or a plain module.
    """
    state = acc.get_state_dict(model) if acc is not None else model.state_dict()
    peft_cfg = getattr(acc.unwrap_model(model) if acc is not None else model, "peft_config", None)
    if not peft_cfg:
        return {k: v for k, v in state.items()}
    scale = {name: c.lora_alpha / c.r for name, c in peft_cfg.items()}
    prefix = "base_model.model."
    out, lora = {}, {}
    for k, v in state.items():
        k = k.removeprefix(prefix)
        if ".lora_A." in k or ".lora_B." in k:
            module, kind, adapter = _split_lora_key(k)
            lora.setdefault((module, adapter), {})[kind] = v
        else:
            out[k.replace(".base_layer.", ".")] = v
    for (module, adapter), ab in lora.items():
        w = out[f"{module}.weight"]
        delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * scale[adapter]
        out[f"{module}.weight"] = (w.float() + delta).to(w.dtype)
    return out


def _split_lora_key(k: str) -> tuple[str, str, str]:
    """'m.q_proj.lora_A.default.weight' -> ('m.q_proj', 'lora_A', 'default')."""
    for kind in ("lora_A", "lora_B"):
        head, sep, tail = k.partition(f".{kind}.")
        if sep:
            return head, kind, tail.removesuffix(".weight")
    raise AssertionError(k)


def delta_names(model, margs: ModelArgs) -> list[str]:
    """Parameters `margs.train` changes, by base-model name."""
    if margs.train == "memory":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return memory_attention_names(base)
    if margs.train == "lora":
        modules = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")
                   and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)}
        return [f"{m}.weight" for m in sorted(modules)]
    raise ValueError("train = 'all' changes every tensor: write a full checkpoint (output = 'full')")


def save_output(model, tokenizer, cfg: RunConfig, out_dir: Path, base_path: Path | None, kind: str = "auto",
                acc=None, extra: dict[str, Any] | None = None) -> Path | None:
    """Write the trained model into out_dir as a full checkpoint or a weight delta. Returns out_dir.

    `model`: plain, or as prepared by `acc` (then every process must call this; the main one writes).
    """
    from safetensors.torch import save_file

    if kind == "auto":
        kind = "full" if cfg.model.train == "all" or base_path is None else "delta"
    if kind == "none":
        return None
    state = trained_state_dict(model, acc)
    if acc is not None:
        if not acc.is_main_process:
            return None
        model = acc.unwrap_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    info = {"train": cfg.model.train, "versions": package_versions(), **(extra or {})}
    if kind == "full":
        if base.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        base.config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        (out_dir / "training.json").write_text(json.dumps({**cfg.to_dict(), **info}, indent=2, default=str) + "\n")
        return out_dir
    if base_path is None:
        raise ValueError("a weight delta needs a base checkpoint (model.path); use output = 'full'")
    from longllama_lsp.model.loading import model_fingerprint

    names = delta_names(model, cfg.model)
    tensors = {n: state[n].detach().contiguous().cpu().clone() for n in names}
    save_file(tensors, str(out_dir / "adapter.safetensors"), metadata={"format": "longllama-delta"})
    meta = {"format": DELTA_FORMAT, "kind": "replace", "base_model": str(Path(base_path).resolve()),
            "base_fingerprint": model_fingerprint(base_path), "mem_layers": list(base.config.mem_layers),
            "tensors": {n: list(t.shape) for n, t in tensors.items()}, **info,
            "lora": ({"r": cfg.model.lora_r, "alpha": cfg.model.lora_alpha, "targets": cfg.model.lora_targets,
                      "layers": cfg.model.lora_layers, "merged": True} if cfg.model.train == "lora" else None)}
    (out_dir / "adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "training.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    return out_dir


def load_trained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 base: str | Path | None = None, check_fingerprint: bool = True):
    """(model, tokenizer) from a training output: a full checkpoint, or a delta dir on its base model."""
    from longllama_lsp.errors import CheckpointError
    from longllama_lsp.model.loading import apply_weight_delta, load_model, load_tokenizer, model_fingerprint

    path = Path(path)
    if (path / "config.json").is_file():
        return load_model(path, device, dtype), load_tokenizer(path)
    meta_file = path / "adapter.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: neither a checkpoint (config.json) nor a weight delta (adapter.json)")
    meta = json.loads(meta_file.read_text())
    base_path = Path(base or meta["base_model"])
    if check_fingerprint and model_fingerprint(base_path) != meta["base_fingerprint"]:
        raise CheckpointError(f"{path}: trained on another base model than {base_path} (fingerprint mismatch)")
    model = load_model(base_path, device, dtype)
    apply_weight_delta(model, path / "adapter.safetensors")
    return model, load_tokenizer(base_path)


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
