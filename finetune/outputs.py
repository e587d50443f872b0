"""What a training run writes and how it is read back: a full checkpoint or a weight delta.

    "full"  = config.json + model.safetensors + tokenizer (load by path)
    "delta" = adapter.safetensors + adapter.json (only the trained tensors: replacements, and a LoRA
              run's adapters as low-rank pairs; applied on the base model named by its fingerprint)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from finetune.config import ATTENTION_PROJ, ModelArgs, RunConfig, package_versions

DELTA_FORMAT = 1


def layer_of(name: str) -> int | None:
    """The decoder layer index in a parameter or module name ('model.layers.3.self_attn...' -> 3)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def memory_attention_names(model) -> list[str]:
    """Parameter names of q/k/v/o of the memory layers (what FoT trains; it adds no parameters)."""
    layers = set(model.config.mem_layers)
    if not layers:
        raise ValueError("model.train = 'memory' needs a model with memory layers (mem_layers is empty)")
    return [n for n, _ in model.named_parameters()
            if layer_of(n) in layers and any(f"self_attn.{p}." in n for p in ATTENTION_PROJ)]


def trained_state_dict(model, acc=None) -> dict[str, torch.Tensor]:
    """Full state dict with base-model names; LoRA merged (W + B·A·alpha/r).

    `model` as prepared by `acc` (gathered from FSDP shards by accelerate) or a plain module.
    """
    return merge_lora(*lora_parts(model, acc))


def merge_lora(state: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
               ) -> dict[str, torch.Tensor]:
    merged = dict(state)
    for module, (down, up) in lora.items():
        w = state[f"{module}.weight"]
        merged[f"{module}.weight"] = (w.float() + up @ down).to(w.dtype)
    return merged


def lora_parts(model, acc=None) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(state dict with base-model names and LoRA unmerged, {module: (down (r, in), up·alpha/r (out, r))})."""
    state = acc.get_state_dict(model) if acc is not None else model.state_dict()
    peft_cfg = getattr(acc.unwrap_model(model) if acc is not None else model, "peft_config", None)
    if not peft_cfg:
        return dict(state), {}
    scale = {name: c.lora_alpha / c.r for name, c in peft_cfg.items()}
    prefix = "base_model.model."
    out, factors = {}, {}
    for k, v in state.items():
        k = k.removeprefix(prefix)
        if ".lora_A." in k or ".lora_B." in k:
            module, kind, adapter = _split_lora_key(k)
            factors.setdefault((module, adapter), {})[kind] = v
        else:
            out[k.replace(".base_layer.", ".")] = v
    lora = {}
    for (module, adapter), ab in factors.items():  # one adapter per module (PEFT's "default")
        lora[module] = (ab["lora_A"].float(), ab["lora_B"].float() * scale[adapter])
    return out, lora


def _split_lora_key(k: str) -> tuple[str, str, str]:
    """'m.q_proj.lora_A.default.weight' -> ('m.q_proj', 'lora_A', 'default')."""
    for kind in ("lora_A", "lora_B"):
        head, sep, tail = k.partition(f".{kind}.")
        if sep:
            return head, kind, tail.removesuffix(".weight")
    raise AssertionError(k)


def lora_delta(state: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
               base_path: Path) -> dict[str, torch.Tensor]:
    """A LoRA run's weight delta (from `lora_parts`) on its base checkpoint as `load_model` builds it
    (with the base's own adapter, e.g. the shipped memory delta, applied first, as every delta is
    applied after it): low-rank pairs for the adapters on weights that the loaded base holds as they
    were; merged replacements for weights changed otherwise (a start delta merged into them), so the
    delta alone rebuilds the trained model on that base."""
    from longllama_lsp.model.loading import LOW_RANK_DOWN, LOW_RANK_UP

    loaded = LoadedBase(base_path)
    state = {n: v.detach().cpu() for n, v in state.items()}
    lora = {module: (down.cpu(), up.cpu()) for module, (down, up) in lora.items()}
    changed = {n for n, v in state.items() if n in loaded and not torch.equal(v, loaded.tensor(n, v.dtype))}
    out = {n: state[n] for n in changed}
    for module, (down, up) in lora.items():
        name = f"{module}.weight"
        if name in changed:
            out[name] = (state[name].float() + up @ down).to(state[name].dtype)
        else:
            out[name + LOW_RANK_DOWN], out[name + LOW_RANK_UP] = down, up
    return out


class LoadedBase:
    """A base checkpoint's tensors as `load_model` builds them: read, cast to the model's dtype, then the
    folder's own adapter applied (replacements, then low-rank pairs). On the CPU, one name at a time."""

    def __init__(self, base_path: Path):
        from longllama_lsp.model.loading import (
            find_adapter,
            read_state_dict,
            read_weight_delta,
            split_weight_delta,
        )

        self.saved = read_state_dict(base_path)
        adapter = find_adapter(base_path)
        self.replace, self.low_rank = split_weight_delta(read_weight_delta(adapter)) if adapter else ({}, {})

    def __contains__(self, name: str) -> bool:
        return name in self.saved or name in self.replace

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from longllama_lsp.model.loading import add_low_rank

        weight = self.replace.get(name, self.saved.get(name)).to(dtype)
        pair = self.low_rank.get(name)
        return weight if pair is None else add_low_rank(weight, pair)


def delta_names(model, margs: ModelArgs) -> list[str]:
    """Parameters `margs.train = 'memory'` changes, by base-model name (a LoRA run: `lora_delta`)."""
    if margs.train == "memory":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return memory_attention_names(base)
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
    state, lora = lora_parts(model, acc)  # every process (FSDP gathers)
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
        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in merge_lora(state, lora).items()}
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        base.config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        (out_dir / "training.json").write_text(json.dumps({**cfg.to_dict(), **info}, indent=2, default=str) + "\n")
        return out_dir
    if base_path is None:
        raise ValueError("a weight delta needs a base checkpoint (model.path); use output = 'full'")
    from longllama_lsp.model.loading import model_fingerprint

    if cfg.model.train == "lora":
        tensors = {n: t.detach().contiguous().cpu().clone() for n, t in lora_delta(state, lora, base_path).items()}
    else:
        tensors = {n: state[n].detach().contiguous().cpu().clone() for n in delta_names(model, cfg.model)}
    save_file(tensors, str(out_dir / "adapter.safetensors"), metadata={"format": "longllama-delta"})
    meta = {"format": DELTA_FORMAT, "kind": "replace, then add low-rank pairs (NAME.lora_down/.lora_up)",
            "base_model": str(Path(base_path).resolve()),
            "base_fingerprint": model_fingerprint(base_path), "mem_layers": list(base.config.mem_layers),
            "tensors": {n: list(t.shape) for n, t in tensors.items()}, **info,
            "lora": ({"r": cfg.model.lora_r, "alpha": cfg.model.lora_alpha, "targets": cfg.model.lora_targets,
                      "layers": cfg.model.lora_layers, "merged": False} if cfg.model.train == "lora" else None)}
    (out_dir / "adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "training.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    return out_dir


def load_trained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer) from a training output: a full checkpoint, or a delta dir on its base model
    (checked as the server checks it: the base's fingerprint and memory layers)."""
    from longllama_lsp.errors import CheckpointError
    from longllama_lsp.model.loading import apply_weight_delta, load_model, load_tokenizer
    from longllama_lsp.resolve import delta_base

    path = Path(path)
    if (path / "config.json").is_file():
        return load_model(path, device, dtype), load_tokenizer(path)
    if not (path / "adapter.json").is_file():
        raise CheckpointError(f"{path}: neither a checkpoint (config.json) nor a weight delta (adapter.json)")
    base, _ = delta_base(path)
    model = load_model(base, device, dtype)
    apply_weight_delta(model, path / "adapter.safetensors")
    return model, load_tokenizer(base)
