"""Fine-tuning configuration, loaded from TOML tables or CLI flags: `[data]` (DataArgs), `[model]`
(ModelArgs), `[train]` (TrainArgs), together a RunConfig; and what a run directory records of it.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import tomllib

TRAIN_MODES = ("all", "memory", "lora")
OUTPUTS = ("auto", "full", "delta", "none")
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class HFSource:
    """One Hugging Face dataset streamed with `datasets.load_dataset(path, name, split=split, streaming=True)`;
    each example's `text_field` is one document (needs `datasets` installed and network access)."""

    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "content"  # The Stack / the-stack-smol field name


@dataclass
class DataArgs:
    """Where documents come from and how they are packed into FoT batches (spec §3.2, §3.3)."""

    # Local directories, globs of directories, or git URLs (cloned with --depth 1 into git_cache_dir).
    sources: list[str] = field(default_factory=list)
    git_cache_dir: str = "~/.cache/longllama-lsp/git"
    hf_datasets: list[HFSource] = field(default_factory=list)
    # Directory-documents with fewer tokens (bos/eos included) are dropped, like the reference TokenFilter.
    min_doc_tokens: int = 2048  # paper Table 6: github subset min 2048 (python subset 4096)
    max_file_bytes: int = 1_000_000  # larger files are generated or data, not code worth learning
    languages: list[str] | None = None  # file suffixes to keep, e.g. [".py", ".ts"]; None = all text files
    dedup: bool = True  # drop files whose content hash was already seen (first in sorted path order wins)
    file_header: str = ""  # prepended to each file in a document, "{path}" = its relative path
    seed: int = 0  # file order inside a directory, document order, train/held-out split
    seq_len: int = 512  # tokens per batch row (T); LongLLaMA used 2048
    batch_size: int = 8  # rows per batch (B), a multiple of pack
    pack: int = 4  # k of doc_aware_k{k}: consecutive rows holding one document stream
    cross_batch_range: int = 3  # R extra contexts per memory-layer query; LongLLaMA-3B used 3
    stepping: bool = True  # pack row j sees a growing range (reference cross_batch_stepping)
    # (step, range) pairs overriding cross_batch_range from that step on, e.g. [(0, 1), (500, 3)].
    d_schedule: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        self.hf_datasets = [h if isinstance(h, HFSource) else HFSource(**h) for h in self.hf_datasets]
        self.d_schedule = sorted((int(s), int(r)) for s, r in self.d_schedule)
        if self.languages is not None:
            self.languages = [x if x.startswith(".") else "." + x for x in self.languages]
        if self.pack < 1 or self.batch_size % self.pack != 0:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of pack {self.pack}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.cross_batch_range < 0 or any(r < 0 for _, r in self.d_schedule):
            raise ValueError("cross-batch ranges must be >= 0")

    def range_at(self, step: int) -> int:
        """Cross-batch range R in force at optimizer step `step`."""
        r = self.cross_batch_range
        for start, value in self.d_schedule:
            if step >= start:
                r = value
        return r

    def crossbatch_at(self, step: int):
        """`CrossBatch` to pass to the model at `step` (imported lazily: data code needs no model)."""
        from longllama_lsp.model.crossbatch import CrossBatch

        return CrossBatch(range=self.range_at(step), pack=self.pack, stepping=self.stepping)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataArgs:
        """From a TOML `[data]` table; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown [data] keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the run directory's params file (round-trips through from_dict)."""
        d = dataclasses.asdict(self)
        d["d_schedule"] = [list(p) for p in self.d_schedule]
        return d


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
        d, text = read_toml(path, overrides)
        cfg = cls.from_dict(d)
        cfg.source_toml = text or None
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "data": self.data.to_dict(),
                "train": dataclasses.asdict(self.train)}


def read_toml(path: str | Path | None, overrides: Iterable[str] = ()) -> tuple[dict[str, Any], str]:
    """(tables, TOML text) of a recipe file ("" when None) with `section.key=value` overrides applied.

    The text (kept in the run dir as train_config.toml) starts with the overrides as comments, so that
    the copy does not read as the run's recipe when the command line changed it."""
    text = Path(path).read_text(encoding="utf-8") if path is not None else ""
    d = tomllib.loads(text)
    overrides = list(overrides)
    for item in overrides:
        apply_override(d, item)
    if overrides:
        text = "".join(f"# overridden on the command line: -o '{item}'\n" for item in overrides) + \
            "# (train_config.json holds the values the run used)\n" + text
    return d, text


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
    import torch

    out["cuda"] = str(torch.version.cuda)
    return out


class RecordedConfig(Protocol):
    """What a run directory records of a config: RunConfig, or retrieval_train.RetrievalConfig."""

    source_toml: str | None

    def to_dict(self) -> dict[str, Any]: ...


def write_run_config(cfg: RecordedConfig, run_dir: Path, extra: dict[str, Any] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    d = {**cfg.to_dict(), "versions": package_versions(), "argv": sys.argv, **(extra or {})}
    (run_dir / "train_config.json").write_text(json.dumps(d, indent=2, default=str) + "\n")
    if cfg.source_toml:
        (run_dir / "train_config.toml").write_text(cfg.source_toml)
