"""Train the memory layers to retrieve (issue 16): `longllama train` on a TOML with a `[retrieval]` table.

Unlike FoT crossbatch (finetune/train.py), memory here is built exactly as at inference: every
memory chunk is encoded on its own (`model.encode_memory`, keys at position 0, an unordered bag)
and the target window attends to it (finetune/retrieval_data.py makes the examples).

Gradient through memory, cheaply. Encoding chunks with full backpropagation would cost a backward
pass through layers 7-21 of every chunk. Instead the chunks are encoded without gradient while a
hook keeps each memory layer's k_proj/v_proj *input* (the normed hidden state, (N, c, C)); the
memory keys and values are then recomputed from those inputs with gradient. So the memory layers'
k/v projections learn from every memory slot (positives and distractors); what is dropped is the
path through the chunk's own hidden states (a memory layer changing the inputs of the next one),
which moves slowly. Shared distractors (the pool) are re-encoded every `pool_refresh` steps and
their keys/values recomputed with the current weights at every step.

What trains (`[model] train`): "memory" (the memory layers' q/k/v/o, as FoT), "lora" (adapters on
`lora_layers` x `lora_targets`; "all" layers with the MLPs is what run 4 tried: the delta keeps
them as low-rank pairs) or "all" (every weight; a full checkpoint, no per-step delta).

Run directory (`train.out_dir`):
    train_config.json          the three tables + package versions
    metrics.jsonl              per logged step: loss, per-kind loss and top-1 accuracy on flagged tokens,
                               lm_nll (the guard term's no-memory NLL, with [retrieval] lm_rows > 0)
    checkpoints/step-N/        trainable tensors + optimizer (safetensors / weights_only torch.save),
                               trainer_state.json, and delta/ (adapter.safetensors + adapter.json: a
                               weight delta that `longllama eval --model` loads; not for "all")
    adapter.safetensors, adapter.json   the final delta ("all": config.json + model.safetensors)
Resume: `-o train.resume=latest` (or `--resume`); each step's examples are seeded by (seed, step),
so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
import torch

from finetune.retrieval_data import KINDS, Example, ExampleMaker, MixArgs, build_maker


@dataclass
class RetrievalTrainArgs:
    """The `[train]` table of a retrieval recipe."""

    out_dir: str = "runs/retrieval"
    steps: int = 200
    max_minutes: float | None = None  # stop after the step that crosses this budget (then save)
    batch_size: int = 8  # examples per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 (CUDA autocast)
    device: str | None = None  # None: cuda when available
    threads: int | None = None  # torch CPU threads (None: torch's default)
    data_workers: int = 0  # processes making the next steps' examples (a GPU outruns one CPU core)
    seed: int = 0
    log_every: int = 1
    save_every: int = 10  # checkpoint (and delta) every N steps, and at the end
    keep_checkpoints: int = 2  # full states kept; older checkpoints keep only delta/ (the curve's points)
    resume: str | None = None  # "latest" or a checkpoint dir

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"train.mixed_precision must be no or bf16, got {self.mixed_precision!r}")
        if self.batch_size < 1 or self.steps < 0:
            raise ValueError("train.batch_size >= 1 and train.steps >= 0 required")


@dataclass
class RetrievalConfig:
    model: Any  # finetune.train.ModelArgs
    retrieval: MixArgs
    train: RetrievalTrainArgs
    source_toml: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrievalConfig:
        from finetune.config import ModelArgs, _section

        unknown = sorted(set(d) - {"model", "retrieval", "train"})
        if unknown:
            raise ValueError(f"unknown config tables {unknown}; a retrieval recipe has [model], [retrieval], [train]")
        return cls(_section(ModelArgs, d.get("model", {}), "model"),
                   _section(MixArgs, d.get("retrieval", {}), "retrieval"),
                   _section(RetrievalTrainArgs, d.get("train", {}), "train"))

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> RetrievalConfig:
        from finetune.config import read_toml

        d, text = read_toml(path, overrides)
        cfg = cls.from_dict(d)
        cfg.source_toml = text
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "retrieval": dataclasses.asdict(self.retrieval),
                "train": dataclasses.asdict(self.train)}


def is_retrieval_recipe(path: str | Path) -> bool:
    """Whether a training TOML is a retrieval recipe (has a [retrieval] table)."""
    return "retrieval" in tomllib.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Memory with gradient to the memory layers' k/v projections


class ProjectionInputs:
    """Captures the input of every memory layer's k_proj during `model.encode_memory`."""

    def __init__(self, model):
        self.layers = {i: model.model.layers[i].self_attn for i in model.config.mem_layers}
        self.seen: dict[int, torch.Tensor] = {}

    def __enter__(self):
        self.handles = [att.k_proj.register_forward_hook(self._hook(i)) for i, att in self.layers.items()]
        return self

    def _hook(self, i: int):
        def hook(_module, args, _out):
            self.seen[i] = args[0].clone() if not torch.is_inference_mode_enabled() else args[0]
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@dataclass
class EncodedChunks:
    """Memory-layer inputs of N chunks of <= c tokens: x[layer] (N, c, C), valid (N, c) bool."""

    x: dict[int, torch.Tensor]
    valid: torch.Tensor


def encode_inputs(model, chunks: list[list[int]], chunk_len: int, pad_id: int,
                  contexts: list[list[int]] | None = None) -> EncodedChunks:
    """Run `model.encode_memory` on right-padded chunks and keep the k/v inputs of their slots.

    `contexts` (one per chunk, may be empty): each chunk is encoded after its context, as the indexer
    encodes a chunk after the text before it in its file; only the chunk's own slots are kept.
    """
    device = next(model.parameters()).device
    n = len(chunks)
    lead = [list(c) if chunks[i] else [] for i, c in enumerate(contexts)] if contexts else [[] for _ in chunks]
    width = max([chunk_len] + [len(lead[i]) + len(c[:chunk_len]) for i, c in enumerate(chunks)])
    ids = torch.full((n, width), pad_id, dtype=torch.long)  # (N, W): context + chunk, right-padded
    seen = torch.zeros((n, width), dtype=torch.bool)  # (N, W): real tokens (what encode_memory may attend)
    slot = torch.zeros((n, chunk_len), dtype=torch.long)  # (N, c): the chunk's j-th token's place in its row
    valid = torch.zeros((n, chunk_len), dtype=torch.bool)
    for i, c in enumerate(chunks):
        row = lead[i] + c[:chunk_len]
        if row:
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            seen[i, :len(row)] = True
        slot[i] = torch.arange(chunk_len) + len(lead[i])
        valid[i, :len(c[:chunk_len])] = True
    seen[:, 0] = True  # an empty chunk (padding of an example with fewer chunks): valid stays False
    slot = slot.clamp_max(width - 1)  # padding slots past a row's end (masked by valid)
    with ProjectionInputs(model) as cap:
        model.encode_memory(ids.to(device), attention_mask=seen.long().to(device))
    x = {i: t.gather(1, slot.to(device)[:, :, None].expand(-1, -1, t.shape[-1])).clone()  # (N, c, C)
         for i, t in cap.seen.items()}  # gather + clone: inference tensors -> normal tensors
    return EncodedChunks(x, valid.to(device))


def memory_from_inputs(model, enc: EncodedChunks, rows: int, repeat: list[int] | None = None):
    """Memory (rows, Hkv, k·c, D) with gradient to k/v_proj: chunk r·k+j is row r's j-th chunk.

    `repeat`: for a shared pool (rows = 1), how many times each chunk counts (duplicates are views).
    """
    from longllama_lsp.model import MemCache, Memory
    from longllama_lsp.model.memory import MASK_MIN

    out = {}
    n, c = enc.valid.shape
    k = n // rows
    idx = None
    if repeat is not None:
        idx = torch.tensor([i for i, r in enumerate(repeat) for _ in range(r)], device=enc.valid.device)
    for layer, x in enc.x.items():
        att = model.model.layers[layer].self_attn
        hkv, d = att.kv_heads, att.head_dim
        keys = att.k_proj(x).view(n, c, hkv, d).transpose(1, 2).to(att.mem_dtype)  # (N, Hkv, c, D)
        values = att.v_proj(x).view(n, c, hkv, d).transpose(1, 2).to(att.mem_dtype)
        mask = torch.where(enc.valid, 0.0, MASK_MIN).to(x.dtype)  # (N, c)
        if idx is not None:
            keys, values, mask = keys[idx], values[idx], mask[idx]
            k = keys.shape[0]
        keys = keys.reshape(rows, k, hkv, c, d).transpose(1, 2).reshape(rows, hkv, k * c, d)
        values = values.reshape(rows, k, hkv, c, d).transpose(1, 2).reshape(rows, hkv, k * c, d)
        out[layer] = MemCache(keys, values, mask.reshape(rows, 1, k * c, 1))
    return Memory(out)


def expand_rows(memory, rows: int):
    from longllama_lsp.model import MemCache, Memory

    return Memory({i: MemCache(c.keys.expand(rows, -1, -1, -1), c.values.expand(rows, -1, -1, -1),
                               c.mask.expand(rows, -1, -1, -1)) for i, c in memory.items()})


# ---------------------------------------------------------------------------------------------
# Loss


def batch_loss(model, examples: list[Example], pool: EncodedChunks | None, pool_repeat: list[int] | None,
               chunk_len: int, pad_id: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Weighted mean NLL of the examples' targets with their memory (+ the pool). Returns (loss, stats)."""
    from longllama_lsp.model import Memory

    device = next(model.parameters()).device
    b = len(examples)
    k = max(len(e.memory) for e in examples)
    chunks = [ex.memory[j] if j < len(ex.memory) else [] for ex in examples for j in range(k)]
    contexts = [ex.contexts[j] if j < len(ex.contexts) else [] for ex in examples for j in range(k)]
    own = memory_from_inputs(model, encode_inputs(model, chunks, chunk_len, pad_id, contexts), b)
    parts = [own]
    if pool is not None:
        parts.append(expand_rows(memory_from_inputs(model, pool, 1, pool_repeat), b))
    memory = Memory.concat(parts)
    ids = torch.tensor([e.ids for e in examples], device=device)  # (B, T+1)
    weights = torch.tensor([e.weights for e in examples], device=device)  # (B, T)
    flags = torch.tensor([e.flags for e in examples], device=device)
    t = ids.shape[1] - 1
    out = model(ids[:, :-1], memory=memory, use_cache=True, last_context_length=t, logits_to_keep=1)
    hidden = out.hidden_states  # (B, T, C): logits only where a loss or a flag is
    keep = (weights > 0) | flags
    logits = model.lm_head(hidden[keep]).float()  # (K, V)
    target = ids[:, 1:][keep]
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    w = weights[keep]
    loss = (nll * w).sum() / w.sum().clamp_min(1e-6)
    with torch.no_grad():
        hit = logits.argmax(-1) == target
        kinds = torch.tensor([KINDS.index(e.kind) for e in examples], device=device)[:, None].expand(b, t)[keep]
        fl = flags[keep]
        stats: dict[str, Any] = {}
        for i, kind in enumerate(KINDS):
            sel = (kinds == i) & fl
            if sel.any():
                stats[f"{kind}_nll"] = float(nll[sel].mean())
                stats[f"{kind}_acc"] = float(hit[sel].float().mean())
                stats[f"{kind}_n"] = int(sel.sum())
    return loss, stats


def plain_loss(model, windows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token NLL of `windows` WITHOUT memory (the guard term: the no-memory path stays put).

    Windows are right-padded (causal: padding after a window's tokens changes nothing before them).
    """
    device = next(model.parameters()).device
    t = max(len(w) for w in windows) - 1
    ids = torch.full((len(windows), t + 1), pad_id, dtype=torch.long)  # (R, T+1)
    real = torch.zeros((len(windows), t), dtype=torch.bool)  # (R, T): target j is a real token
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.tensor(w)
        real[i, :len(w) - 1] = True
    ids, real = ids.to(device), real.to(device)
    out = model(ids[:, :-1], use_cache=True, last_context_length=t, logits_to_keep=1)
    logits = model.lm_head(out.hidden_states[real]).float()  # (K, V)
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:][real])


# ---------------------------------------------------------------------------------------------
# Loop, checkpoints


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, model, opt, sched, state: dict[str, Any], cfg: RetrievalConfig, tokenizer,
                    base: Path | None, keep: int, pool: EncodedChunks | None = None,
                    pool_repeat: list[int] | None = None) -> Path:
    from safetensors.torch import save_file

    ckpt = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    tmp = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
    if pool is not None:  # the pool was encoded with older weights: resuming must reuse it, not re-encode
        save_file({**{f"x.{i}": x.cpu().contiguous() for i, x in pool.x.items()}, "valid": pool.valid.cpu(),
                   "repeat": torch.tensor(pool_repeat)}, str(tmp / "pool.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
    if base is not None and cfg.model.train != "all":  # train = 'all': a full copy per checkpoint is no curve point
        write_output(model, cfg, tokenizer, base, tmp / "delta", state)
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)  # a checkpoint dir exists only once complete
    for old in sorted((run_dir / "checkpoints").glob("step-*[0-9]"))[:-max(keep, 1)]:
        for f in old.iterdir():  # keep delta/ (a point of the curve) and trainer_state.json
            if f.name not in ("delta", "trainer_state.json"):
                f.unlink()
    return ckpt


def write_output(model, cfg: RetrievalConfig, tokenizer, base: Path, out: Path, state: dict[str, Any]) -> None:
    """The trained weights in `out`: a weight delta, or a full checkpoint when every tensor trained."""
    from finetune.config import RunConfig
    from finetune.outputs import save_output

    run = RunConfig(model=cfg.model)
    save_output(model, tokenizer, run, out, base, "full" if cfg.model.train == "all" else "delta",
                extra={"recipe": "retrieval (finetune/retrieval_train.py)", "steps": state["step"],
                       "examples": state["examples"], "tokens": state["tokens"]})
    (out / "training.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")


def latest_checkpoint(run_dir: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    found = [c for c in sorted((run_dir / "checkpoints").glob("step-*[0-9]")) if (c / "optimizer.pt").is_file()]
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir / 'checkpoints'}")
    return found[-1]


def train_retrieval(cfg: RetrievalConfig, maker: ExampleMaker | None = None, progress: bool = True):
    """Train as `cfg` says; returns (model, run dir, final state)."""
    from safetensors.torch import load_file

    from finetune.config import write_run_config
    from finetune.train import _log, _lr_lambda, _trim_metrics, load_for_training
    from longllama_lsp.load import resolve_device_dtype

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device_dtype(t.device)[0]
    model, tokenizer, base = load_for_training(cfg.model, device=device)
    # PEFT wraps the model for 'lora' (the adapters sit inside the base model's modules): forward
    # passes reach the memory layers through `net`; checkpoints and outputs go through `model`.
    net = model.get_base_model() if cfg.model.train == "lora" else model
    maker = maker or build_maker(cfg.retrieval, tokenizer)
    run_dir = Path(t.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = list(_trainable(model).values())
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t.warmup_steps))
    state = {"step": 0, "examples": 0, "tokens": 0, "elapsed_s": 0.0}
    pool: EncodedChunks | None = None
    pool_repeat: list[int] | None = None
    if t.resume:
        ckpt = latest_checkpoint(run_dir, t.resume)
        saved = load_file(str(ckpt / "trainable.safetensors"))
        with torch.no_grad():
            for n, p in _trainable(model).items():
                p.copy_(saved[n])
        st = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if (ckpt / "pool.safetensors").is_file():
            saved = load_file(str(ckpt / "pool.safetensors"), device=device)
            pool_repeat = saved.pop("repeat").tolist()
            valid = saved.pop("valid")
            pool = EncodedChunks({int(k.split(".")[1]): v for k, v in saved.items()}, valid)
        print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr, flush=True)
    else:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    write_run_config(cfg, run_dir, {"device": device})
    _trim_metrics(run_dir / "metrics.jsonl", state["step"])
    mix, pad = cfg.retrieval, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if t.mixed_precision == "bf16" else contextlib.nullcontext()
    start = time.perf_counter() - state["elapsed_s"]
    batches = StepBatches(maker, t.seed, t.batch_size, t.data_workers, cfg.retrieval, tokenizer)
    model.train()
    while state["step"] < t.steps:
        if t.max_minutes is not None and time.perf_counter() - start > 60 * t.max_minutes:
            break
        step = state["step"]
        t0 = time.perf_counter()
        if pool is None or step % mix.pool_refresh == 0:
            chunks, pool_repeat, contexts = maker.pool(random.Random(f"{t.seed}:pool:{step // mix.pool_refresh}"))
            with torch.no_grad():
                pool = encode_inputs(net, chunks, mix.chunk_len, pad, contexts) if chunks else None
        batch = batches.get(step)
        plain = plain_batch(maker, t.seed, step, mix.lm_rows)
        t_data = time.perf_counter() - t0
        with amp:
            loss, stats = batch_loss(net, batch, pool, pool_repeat, mix.chunk_len, pad)
            if plain:  # `loss` stays the retrieval loss in metrics.jsonl (comparable across runs)
                lm = plain_loss(net, plain, pad)
                stats["lm_nll"] = lm.item()
        (loss + mix.lm_weight * lm if plain else loss).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else None
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["examples"] += len(batch)
        state["tokens"] += sum(len(e.ids) - 1 + sum(len(c) for c in e.memory) for e in batch)
        state["elapsed_s"] = time.perf_counter() - start
        if state["step"] % t.log_every == 0 or state["step"] == t.steps:
            rec = {"step": state["step"], "loss": loss.item(), "lr": lr, "examples": state["examples"],
                   "tokens": state["tokens"], "step_s": round(time.perf_counter() - t0, 2),
                   "data_s": round(t_data, 2), "elapsed_s": round(state["elapsed_s"], 1),
                   "grad_norm": float(norm) if norm is not None else None, **stats}
            _log(run_dir, rec)
            if progress:
                print(json.dumps(rec), file=sys.stderr, flush=True)
        if t.save_every and state["step"] % t.save_every == 0:
            save_checkpoint(run_dir, model, opt, sched, state, cfg, tokenizer, base, t.keep_checkpoints, pool,
                            pool_repeat)
    if t.save_every and not (run_dir / "checkpoints" / f"step-{state['step']:07d}").exists():
        save_checkpoint(run_dir, model, opt, sched, state, cfg, tokenizer, base, t.keep_checkpoints, pool,
                        pool_repeat)
    batches.close()
    if base is not None:
        write_output(model, cfg, tokenizer, base, run_dir, state)
    return model, run_dir, state


def step_batch(maker: ExampleMaker, seed: int, step: int, size: int) -> list[Example]:
    """The examples of optimizer step `step` (seeded by (seed, step): resuming needs no replay)."""
    rng = random.Random(f"{seed}:step:{step}")
    return [maker.example(rng) for _ in range(size)]


def plain_batch(maker: ExampleMaker, seed: int, step: int, rows: int) -> list[list[int]]:
    """Step `step`'s plain windows for the guard term (own seed: the retrieval examples do not change)."""
    rng = random.Random(f"{seed}:plain:{step}")
    return [w for w in (maker.plain(rng) for _ in range(rows)) if len(w) >= 2]


_WORKER_MAKER: ExampleMaker | None = None


def _init_worker(mix: MixArgs, tokenizer) -> None:
    global _WORKER_MAKER
    torch.set_num_threads(1)
    _WORKER_MAKER = build_maker(mix, tokenizer)


def _worker_batch(seed: int, step: int, size: int) -> list[Example]:
    return step_batch(_WORKER_MAKER, seed, step, size)


class StepBatches:
    """Examples per step, made in-process or by `workers` processes a few steps ahead (same data)."""

    def __init__(self, maker: ExampleMaker, seed: int, size: int, workers: int, mix: MixArgs, tokenizer):
        self.maker, self.seed, self.size, self.workers = maker, seed, size, workers
        self.pending: dict[int, Any] = {}
        self.pool = None
        if workers > 0:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(mix, tokenizer))

    def get(self, step: int) -> list[Example]:
        if self.pool is None:
            return step_batch(self.maker, self.seed, step, self.size)
        for ahead in range(step, step + 2 * self.workers):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(_worker_batch, self.seed, ahead, self.size)
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def run(config: str | Path, overrides: list[str]) -> int:
    """`longllama train RECIPE` for a recipe with a [retrieval] table."""
    cfg = RetrievalConfig.load(config, overrides)
    _, run_dir, state = train_retrieval(cfg)
    print(f"trained {state['step']} steps, {state['examples']} examples, {state['tokens']} tokens in "
          f"{state['elapsed_s']:.0f} s\nrun dir: {run_dir}")
    return 0
