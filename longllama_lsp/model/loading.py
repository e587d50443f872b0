"""Load LongLLaMA (and plain LLaMA) checkpoints lean and safely, and fingerprint them for the index.

A checkpoint is a folder in the HF layout:

    config.json                     model_type "longllama" (or "llama": loaded with mem_layers [])
    model.safetensors               or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    pytorch_model.bin               or pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json
    tokenizer.json / tokenizer.model, tokenizer_config.json, chat_template.jinja ...
    adapter.safetensors             optional: a weight delta applied on top (the FoT-trained layers):
                                    replacement tensors, and low-rank pairs (apply_weight_delta)

The model is built on the meta device and the checkpoint's tensors are assigned to it, after every
name and shape is checked, so a wrong file fails with a message instead of a half-random model.
`.bin` files are read with `torch.load(weights_only=True)`: a pickle that holds code is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import threading
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError, ModelError

if TYPE_CHECKING:  # the config class imports transformers (seconds): only loading a model needs it
    from transformers import PreTrainedTokenizerBase

    from .configuration_longllama import LongLlamaConfig
    from .modeling_longllama import LongLlamaForCausalLM

log = logging.getLogger(__name__)

MODEL_TYPES = ("longllama", "llama")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_NAME = "adapter.safetensors"
PROVENANCE_NAME = "longllama_convert.json"  # what `longllama convert` recorded about the source
# Tokenizer files as transformers writes or reads them; whichever exist are copied and fingerprinted.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
# Saved by old transformers (< 4.31) as persistent buffers; recomputed from the config, never loaded.
IGNORED_KEYS = (r"rotary_emb\.inv_freq$",)
# config.json keys that say nothing about what the model computes (tooling, dtype of the file, training).
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "architectures", "auto_map", "dtype",
                                  "torch_dtype", "use_cache", "mem_attention_grouping",
                                  "gradient_checkpoint_every_ith"})
HASH_SIDECAR = ".longllama-hashes.json"
FINGERPRINT_FORMAT = 1
_LIST_LIMIT = 5  # problems listed per kind in an error message


# ---------------------------------------------------------------------------------------------- config

def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The raw config.json of a checkpoint folder."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a checkpoint folder (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from None


def load_config(path: str | Path) -> LongLlamaConfig:
    """A checkpoint's config as a LongLlamaConfig; a plain LLaMA config gets `mem_layers=[]`."""
    from .configuration_longllama import LongLlamaConfig

    raw = read_config_dict(path)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported (expected one of "
                              f"{', '.join(MODEL_TYPES)}); convert it first with `longllama convert`")
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    if model_type == "llama":
        raw["mem_layers"] = []
    try:
        return LongLlamaConfig.from_dict(raw)
    except Exception as exc:  # strict-dataclass validation errors do not share a base class with ValueError
        raise CheckpointError(f"{path}/config.json: invalid config: {exc}") from None


# --------------------------------------------------------------------------------------------- weights

def weight_files(path: str | Path) -> list[Path]:
    """The files holding a checkpoint's weights: safetensors first, then pytorch .bin; sharded or not."""
    path = Path(path)
    for index, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path / index}: cannot read the shard index ({exc})") from None
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard files listed in {index} are missing: {missing[:_LIST_LIMIT]}")
            return files
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"{path}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, by parameter name (CPU; .bin files memory-mapped)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        part = _read_safetensors(file) if file.suffix == ".safetensors" else _read_bin(file)
        duplicated = state.keys() & part.keys()
        if duplicated:
            raise CheckpointError(f"{file}: tensors also found in another shard: {sorted(duplicated)[:_LIST_LIMIT]}")
        state.update(part)
    return state


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch pickle of tensors. weights_only=True: unpickling any other global raises, nothing runs."""
    try:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (pre-zipfile) pickles cannot be mapped; read them whole
                raise
            data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        log.debug("refused %s: %s", file, exc)
        raise CheckpointError(f"{file}: not a weights file (refusing to unpickle code)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from None
    if not isinstance(data, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{file}: not a weights file (expected a mapping of names to tensors)")
    return dict(data)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path
                     ) -> dict[str, torch.Tensor]:
    """The tensors to assign to `model`, or CheckpointError listing missing/unexpected/misshapen ones.

    Tied parameters (lm_head when tie_word_embeddings) are not expected and dropped if present;
    stale RoPE buffers of old checkpoints are ignored.
    """
    tied = set(_tied_keys(model))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    ignored = [re.compile(p) for p in (*IGNORED_KEYS, *(getattr(model, "_keys_to_ignore_on_load_unexpected",
                                                                None) or ()))]
    given = {k: v for k, v in state_dict.items() if k not in tied and not any(p.search(k) for p in ignored)}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    shapes = [f"{k}: expected {expected[k]}, got {tuple(given[k].shape)}"
              for k in sorted(expected.keys() & given.keys()) if tuple(given[k].shape) != expected[k]]
    problems = [f"{len(items)} {kind} ({'; '.join(items[:_LIST_LIMIT])}{', ...' if len(items) > _LIST_LIMIT else ''})"
                for kind, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", shapes)) if items]
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit the config: " + "; ".join(problems))
    return given


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """{tied parameter: the one it shares}, e.g. {"lm_head.weight": "model.embed_tokens.weight"}."""
    getter = getattr(model, "get_expanded_tied_weights_keys", None)
    return dict(getter(all_submodels=True)) if getter is not None else {}


# ------------------------------------------------------------------------------------------ the model

def build_model(config: LongLlamaConfig, state_dict: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, model_cls: type[nn.Module] | None = None,
                source: str | Path = "checkpoint") -> nn.Module:
    """`model_cls(config)` built on the meta device, then given the checked tensors (assign=True)."""
    if model_cls is None:
        from .modeling_longllama import LongLlamaForCausalLM as model_cls
    with torch.device("meta"):
        model = model_cls(config)
    tensors = check_state_dict(model, state_dict, source)
    tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)  # strict=False: tied keys are absent on purpose
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _materialize_buffers(model, device)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    assert not leftover, f"tensors left on the meta device: {leftover[:_LIST_LIMIT]}"
    return model.eval()


def _materialize_buffers(model: nn.Module, device: str | torch.device) -> None:
    """Recompute the non-persistent buffers (RoPE inverse frequencies) that the meta build left empty.

    Each owning module is re-initialized with the model's `_init_weights`, as transformers'
    from_pretrained does for them; that touches only the buffers (the owners hold no parameters).
    """
    owners: dict[str, nn.Module] = {}
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[attr] = torch.empty_like(buf, device=device)
            owners[owner_name] = owner
    init = getattr(model, "_init_weights", None)
    for owner_name, owner in owners.items():
        if init is None or any(True for _ in owner.parameters(recurse=False)):
            raise CheckpointError(f"cannot recompute the buffers of {owner_name or 'the model'} "
                                  f"({type(owner).__name__})")
        with torch.no_grad():
            init(owner)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32, *,
               adapter: bool | str | Path = True, model_cls: type[nn.Module] | None = None
               ) -> LongLlamaForCausalLM:
    """A checkpoint folder as an eval-mode model on `device` in `dtype`.

    adapter: True applies `<path>/adapter.safetensors` when present; a path applies that file; False none.
    model_cls: another class with HF LLaMA parameter names (e.g. transformers' LlamaForCausalLM, for parity tests).
    """
    path = Path(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = build_model(load_config(path), read_state_dict(path), device=device, dtype=dtype,
                        model_cls=model_cls, source=path)
    adapter_file = find_adapter(path) if adapter is True else (Path(adapter) if adapter else None)
    if adapter_file is not None:
        apply_weight_delta(model, adapter_file)
    return model


def find_adapter(path: str | Path) -> Path | None:
    """The checkpoint's adapter (replacement tensors applied at load time), if it has one."""
    file = Path(path) / ADAPTER_NAME
    return file if file.is_file() else None


def memory_training(path: str | Path) -> str | None:
    """How the checkpoint's memory layers were FoT-trained, or None when they were not.

    Untrained memory layers make predictions worse (BENCHMARKS.md, issue 6), so callers warn when
    memory is on without this. Evidence, in order: a FoT weight delta (adapter.safetensors: ours or
    `longllama finetune`'s), a full `longllama train` output (training.json), a LongLLaMA checkpoint
    that no conversion of ours produced (a published one), a conversion of a LongLLaMA checkpoint.
    """
    path = Path(path)
    if find_adapter(path) is not None:
        return "FoT weight delta (adapter.safetensors)"
    if (path / "training.json").is_file():
        return "trained by longllama train (training.json)"
    provenance = read_provenance(path)
    if provenance is None:
        return "LongLLaMA checkpoint" if read_config_dict(path).get("model_type") == "longllama" else None
    return "converted from a LongLLaMA checkpoint" if provenance.get("source_kind") == "longllama" else None


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """What `longllama convert` recorded about the checkpoint's source (its source, source_kind, ...):
    None when no conversion of ours made it, {} when the record is unreadable."""
    file = Path(path) / PROVENANCE_NAME
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# A weight delta holds replacement tensors by parameter name, and low-rank increments as pairs
# NAME.lora_down (r, in) and NAME.lora_up (out, r), scale folded in: NAME += up @ down. A LoRA run on
# every layer is ~10 MB as pairs and ~200 MB merged. Replacements apply first (a run's start value),
# then the increments.
LOW_RANK_DOWN, LOW_RANK_UP = ".lora_down", ".lora_up"


def split_weight_delta(delta: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(replacements by name, {name: {".lora_down": down, ".lora_up": up}}) of a delta's tensors."""
    replace: dict[str, torch.Tensor] = {}
    low_rank: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in delta.items():
        suffix = next((s for s in (LOW_RANK_DOWN, LOW_RANK_UP) if key.endswith(s)), None)
        if suffix is None:
            replace[key] = tensor
        else:
            low_rank.setdefault(key.removesuffix(suffix), {})[suffix] = tensor
    return replace, low_rank


def stack_weight_deltas(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One delta equal to applying `first`, then `second`: a replacement in `second` drops what `first`
    did to that name; two increments of one name become one pair of the summed rank."""
    replace, low_rank = split_weight_delta(first)
    replace2, low_rank2 = split_weight_delta(second)
    replace.update(replace2)
    low_rank = {name: pair for name, pair in low_rank.items() if name not in replace2}
    for name, pair in low_rank2.items():
        if len(low_rank.get(name, {})) == 2 and len(pair) == 2:  # an unpaired half is refused when applied
            old = low_rank[name]  # up1 @ down1 + up2 @ down2 = [up1 up2] @ [down1; down2]
            pair = {LOW_RANK_DOWN: torch.cat([old[LOW_RANK_DOWN].float(), pair[LOW_RANK_DOWN].float()], 0),
                    LOW_RANK_UP: torch.cat([old[LOW_RANK_UP].float(), pair[LOW_RANK_UP].float()], 1)}
        low_rank[name] = pair
    return {**replace, **{name + suffix: t for name, pair in low_rank.items() for suffix, t in pair.items()}}


def _low_rank_problems(low_rank: dict[str, dict[str, torch.Tensor]], targets: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for name, pair in sorted(low_rank.items()):
        down, up = pair.get(LOW_RANK_DOWN), pair.get(LOW_RANK_UP)
        if down is None or up is None:
            problems.append(f"{name}: {LOW_RANK_DOWN} without {LOW_RANK_UP} or the reverse")
        elif name in targets and (down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]
                                  or (up.shape[0], down.shape[1]) != tuple(targets[name].shape)):
            problems.append(f"{name}: expected up @ down of {tuple(targets[name].shape)}, got "
                            f"{tuple(up.shape)} @ {tuple(down.shape)}")
    return problems


def apply_weight_delta(model: nn.Module, path: str | Path) -> list[str]:
    """Apply a safetensors weight delta to `model` in place; returns the names it changed.

    Replacement tensors overwrite parameters, low-rank pairs add to them (see LOW_RANK_DOWN). Every
    name must be a parameter (or persistent buffer) of the model with a fitting shape, else
    CheckpointError and nothing is changed. Tied parameters change together.
    """
    return apply_delta_tensors(model, read_weight_delta(path), str(path))


def read_weight_delta(path: str | Path) -> dict[str, torch.Tensor]:
    """A weight delta's tensors (replacements and low-rank pairs), not yet applied."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter file not found")
    return _read_safetensors(path)


def apply_delta_tensors(model: nn.Module, delta: dict[str, torch.Tensor], source: str,
                        keep_pairs: Collection[str] = ()) -> list[str]:
    """`apply_weight_delta` on tensors already read; `source` names them in errors. The low-rank
    pairs of the weights in `keep_pairs` are checked like the rest but not added (a LoRA run that
    continues this delta starts its adapters at them)."""
    replace, low_rank = split_weight_delta(delta)
    targets = model.state_dict(keep_vars=True)
    unknown = sorted((replace.keys() | low_rank.keys()) - targets.keys())
    shapes = [f"{k}: expected {tuple(targets[k].shape)}, got {tuple(v.shape)}"
              for k, v in sorted(replace.items()) if k in targets and v.shape != targets[k].shape]
    pairs = _low_rank_problems(low_rank, targets)
    if unknown or shapes or pairs:
        raise CheckpointError(f"{source}: adapter does not fit the model: "
                              + "; ".join(f"{kind}: {items[:_LIST_LIMIT]}" for kind, items in
                                          (("unknown tensors", unknown), ("wrong shapes", shapes),
                                           ("low-rank pairs", pairs)) if items))
    with torch.no_grad():
        for name, tensor in replace.items():
            targets[name].copy_(tensor.to(dtype=targets[name].dtype, device=targets[name].device))
        added = {name: pair for name, pair in low_rank.items() if name not in keep_pairs}
        for name, pair in added.items():
            targets[name].copy_(add_low_rank(targets[name], pair))
    return sorted(replace.keys() | added.keys())


def add_low_rank(weight: torch.Tensor, pair: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """weight + up @ down, summed in float32 and cast back to weight's dtype (how every delta adds a pair)."""
    step = pair[LOW_RANK_UP].float() @ pair[LOW_RANK_DOWN].float()  # (out, in)
    return (weight.float() + step.to(weight.device)).to(weight.dtype)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (tokenizer.json, or a SentencePiece tokenizer.model)."""
    from transformers import AutoTokenizer

    from . import register_config

    register_config()  # AutoTokenizer reads config.json (registration may be deferred: see the package)
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        if not (path / "tokenizer.model").is_file():
            raise CheckpointError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
        missing = [m for m in ("sentencepiece", "google.protobuf") if not module_available(m)]
        if missing:
            raise ModelError(f"{path}: its tokenizer is a SentencePiece tokenizer.model, which needs "
                             f"`pip install sentencepiece protobuf` (or re-run `longllama convert` where they "
                             f"are installed: it adds a tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({exc})") from None


def module_available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # parent package missing
        return False


# ------------------------------------------------------------------------------------------ fingerprint

def model_fingerprint(path: str | Path) -> str:
    """sha256 identifying what a checkpoint computes: config, weights, adapter, tokenizer."""
    return fingerprint_details(path)["fingerprint"]


def fingerprint_details(path: str | Path) -> dict[str, Any]:
    """The fingerprint and its parts, for the index's meta table.

    The config part is config.json's JSON, sorted, without tooling keys (VOLATILE_CONFIG_KEYS);
    file parts are content hashes, cached in a sidecar keyed by size and mtime.
    """
    path = Path(path)
    raw = read_config_dict(path)
    config = {k: v for k, v in raw.items() if k not in VOLATILE_CONFIG_KEYS}
    names = [f.name for f in weight_files(path)]
    adapter = find_adapter(path)
    tokenizer = [n for n in TOKENIZER_FILES if (path / n).is_file()]
    hashes = _file_hashes(path, [*names, *tokenizer, *([adapter.name] if adapter else [])])
    parts: dict[str, Any] = {
        "format": FINGERPRINT_FORMAT,
        "model_type": raw.get("model_type"),
        "mem_layers": list(raw.get("mem_layers") or []),
        "mem_dtype": raw.get("mem_dtype", "bfloat16") if raw.get("model_type") == "longllama" else None,
        "config_sha256": _sha256_bytes(_canonical_json(config)),
        "weights": {n: hashes[n] for n in names},
        "adapter": hashes[adapter.name] if adapter else None,
        "tokenizer": {n: hashes[n] for n in tokenizer},
    }
    return {"fingerprint": _sha256_bytes(_canonical_json(parts)), **parts}


def file_sha256(file: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's contents, streamed."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_hashes(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 per file, reusing the sidecar's entry while a file's size and mtime are unchanged."""
    sidecar = folder / HASH_SIDECAR
    try:
        cached = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    out, changed = {}, False
    for name in names:
        st = (folder / name).stat()
        key = [st.st_size, st.st_mtime_ns]
        entry = cached.get(name)
        if not (isinstance(entry, dict) and entry.get("key") == key):
            entry = {"key": key, "sha256": file_sha256(folder / name)}
            cached[name], changed = entry, True
        out[name] = entry["sha256"]
    if changed:
        _write_sidecar(sidecar, cached)
    return out


def _write_sidecar(sidecar: Path, data: dict) -> None:
    """Best effort: a read-only checkpoint (system install, shared cache) is just hashed every time."""
    tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, sidecar)
    except OSError as exc:
        log.debug("cannot cache file hashes in %s: %s", sidecar, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
