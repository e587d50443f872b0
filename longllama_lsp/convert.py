"""`longllama convert`: a GGUF file or a LLaMA/LongLLaMA checkpoint -> a LongLLaMA checkpoint folder.

    longllama convert SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-longllama
    longllama convert path/to/llama-dir --mem-layers 8,16,24 --window 4096 --out my-longllama

Sources: a GGUF file of the llama, qwen2 or starcoder2 architecture (dequantized with transformers'
GGUF reader; tokenizer and chat template kept), a HF folder of a LLaMA-style family (FAMILIES: LLaMA/CodeLlama, Llama-3.x and
DeepSeek-Coder with any rope_scaling, Mistral, Qwen2/Qwen2.5-Coder, StarCoder2; a sliding window
must not be smaller than ours), a LongLLaMA folder (re-saved with new memory settings), or a hub id
(only when online). Memory layers add no parameters (spec §1.3), so conversion is a config change
(the family's switches, see LongLlamaConfig) plus a re-save of the same tensors as safetensors, and
a README.md model card.

The output is written into `OUT.tmp-XXXX` and renamed into place at the end, so an interrupted
conversion never leaves a half checkpoint at OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import DTYPES, Command
from .errors import ModelError

if TYPE_CHECKING:
    import torch

    from .model.configuration_longllama import LongLlamaConfig

# torch, transformers and the model are imported inside the functions: `longllama --help` imports
# this module to build its parser and must answer instantly.

Progress = Callable[[str], None]

CONVERT_FORMAT = 1  # bump when the output changes, so cached conversions (resolve.py) are redone
MEM_DTYPES = ("float32", "float16", "bfloat16")  # configuration_longllama.MEM_DTYPES (a test keeps them equal)
# Window (= max_position_embeddings, the reference's lctx) for sources that are not LongLLaMA yet.
# 2048: a full 2048-token forward of SmolLM2-135M takes ~4.5 s on 2 CPU cores and cost grows
# quadratically inside a window (8192 would also mean 1.6 GB of logits); LongLLaMA-3B uses 2048 too.
DEFAULT_WINDOW = 2048
MAX_SHARD_BYTES = 2 << 30  # larger checkpoints are written as model-0000k-of-0000n.safetensors
# model_type -> the family, as the model card names it. Each differs from LLaMA only in config switches.
FAMILIES = {"llama": "LLaMA architecture", "mistral": "Mistral", "qwen2": "Qwen2 / Qwen2.5-Coder",
            "starcoder2": "StarCoder2", "longllama": "LongLLaMA"}
# What our model lacks for families people ask about; any other model_type gets the generic error.
MISSING = {
    "gemma": "embeddings scaled by sqrt(hidden_size), RMSNorm with (1 + weight), a GeGLU MLP",
    "gemma2": "embeddings scaled by sqrt(hidden_size), RMSNorm with (1 + weight), extra norms around attention "
              "and MLP, logit soft-capping, alternating sliding-window layers",
    "gemma3": "embeddings scaled by sqrt(hidden_size), RMSNorm with (1 + weight), per-head q/k norms, "
              "alternating sliding-window layers with two RoPE bases",
    "qwen3": "per-head RMSNorm of queries and keys (q_norm, k_norm)",
    "phi3": "fused qkv_proj and gate_up_proj weights",
    "phi": "partial rotary embeddings and parallel attention + MLP blocks",
    "gpt_bigcode": "learned absolute positions instead of RoPE, multi-query attention with fused c_attn",
    "gpt2": "learned absolute positions instead of RoPE, fused c_attn",
    "mixtral": "a mixture-of-experts MLP", "qwen2_moe": "a mixture-of-experts MLP",
    "deepseek_v2": "multi-head latent attention and a mixture-of-experts MLP",
    "deepseek_v3": "multi-head latent attention and a mixture-of-experts MLP",
}
# Config keys that describe the source file or tooling, not the model.
_DROP_CONFIG_KEYS = frozenset({"model_type", "transformers_version", "architectures", "auto_map", "dtype",
                               "torch_dtype", "_name_or_path", "_model_name_or_path"})
# What a hub download fetches (not e.g. LongLLaMA-Code's quantized/ folder); plus the tokenizer files.
HUB_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json", "README.md"]  # README: the licence
MODEL_CARD = "README.md"
# GGUF general.architecture -> transformers' classes whose parameter names its tensors map to
# (llama.cpp writes Mistral and CodeLlama as "llama").
GGUF_ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                      "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM")}


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


def default_mem_layers(num_layers: int) -> list[int]:
    """Every (L // 4)-th layer, three times: reproduces both published placements
    (26 layers -> [6, 12, 18] for LongLLaMA-3B, 32 -> [8, 16, 24] for LongLLaMA-Code-7B);
    SmolLM2's 30 layers -> [7, 14, 21]."""
    step = max(1, num_layers // 4)
    return [i for i in (step, 2 * step, 3 * step) if i < num_layers]


@dataclass
class Source:
    kind: str  # "gguf" | "llama" | "longllama"
    path: Path  # the GGUF file or the checkpoint folder
    config: dict[str, Any]  # the source's config keys (LLaMA names)
    tensors: dict[str, torch.Tensor]  # HF LLaMA parameter names
    write_tokenizer: Callable[[Path], None]
    generation_config: Path | None = None
    hub_id: str | None = None
    license: str | None = None  # when the source says: GGUF `general.license`, a model card's `license:`


def convert(src: str | Path, out: str | Path, mem_layers: Sequence[int] | None = None, mem_dtype: str | None = None,
            last_context_length: int | None = None, dtype: str = "float32", *, window: int | None = None,
            overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Convert `src` into a LongLLaMA checkpoint folder at `out`; returns `out`.

    None means: mem_layers = the source's (LongLLaMA) or `default_mem_layers`; mem_dtype = the
    source's or bfloat16; window = the source's (LongLLaMA) or min(its context, DEFAULT_WINDOW);
    last_context_length = the source's when the window is unchanged, else window // 2.
    """
    import torch

    from .model import LongLlamaForCausalLM
    from .model.loading import PROVENANCE_NAME, check_state_dict

    progress = progress or _quiet
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)  # before the expensive part
    source = open_source(src, progress)
    config = target_config(source, mem_layers, mem_dtype, last_context_length, dtype, window)
    with torch.device("meta"):
        skeleton = LongLlamaForCausalLM(config)
    tensors = check_state_dict(skeleton, source.tensors, source.path)  # also drops a tied lm_head
    with _atomic_dir(out, overwrite) as tmp:
        config.to_json_file(tmp / "config.json", use_diff=False)
        progress(f"Writing {dtype} weights...")
        _write_weights(tensors, tmp, getattr(torch, dtype))
        source.write_tokenizer(tmp)
        _write_generation_config(source, config, tmp)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(_provenance(source, config), indent=2) + "\n")
        write_model_card(tmp, out.name)
    progress(f"Wrote {out}")
    return out


# -------------------------------------------------------------------------------------------- sources

def open_source(src: str | Path, progress: Progress = _quiet) -> Source:
    """Read a GGUF file, a LLaMA-family folder or a hub id (downloaded) into memory-mapped tensors."""
    path, hub_id = Path(src).expanduser(), None
    if not path.exists():
        if not is_hub_id(str(src)):
            raise ModelError(f"{src}: no such file or folder")
        path, hub_id = download(str(src), progress), str(src)
    path = convertible(path.absolute())
    source = _read_gguf(path, progress) if path.is_file() else _read_folder(path, progress)
    source.hub_id = hub_id
    return source


def convertible(path: Path) -> Path:
    """The file or folder to read for existing `path`: a folder without config.json may hold one .gguf.

    ModelError otherwise, raised before anything is written (resolve checks it before taking a lock
    in the cache, so a wrong --model leaves nothing behind there).
    """
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelError(f"{path}: not a checkpoint folder (no config.json) and not holding exactly one .gguf")
        return ggufs[0]
    return path


def _read_gguf(path: Path, progress: Progress) -> Source:
    from .model.loading import module_available

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file")
    if not module_available("gguf"):
        raise ModelError("reading GGUF files needs the gguf package: `pip install gguf`")
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    with _corrupt_gguf_is_model_error(path):
        arch, num_layers, licence = _gguf_header(path)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported (GGUF files of "
                         f"{', '.join(GGUF_ARCHITECTURES)} are)")
    progress(f"Reading {path.name} (dequantizing to float32)...")
    # tqdm.auto writes a bar per call to stderr, which is the server's log; our progress lines suffice.
    with mock.patch.object(gguf_utils, "tqdm", lambda items, **_: items), _corrupt_gguf_is_model_error(path):
        parsed = gguf_utils.load_gguf_checkpoint(str(path), return_tensors=True,
                                                 model_to_load=_NameSkeleton(arch, num_layers))
    config = {k: v for k, v in parsed["config"].items() if k not in _DROP_CONFIG_KEYS or k == "model_type"}
    return Source("gguf", path, config, family_tensors(config.get("model_type", arch), parsed["tensors"]),
                  lambda out: _gguf_tokenizer(path, out), license=licence)


@contextlib.contextmanager
def _corrupt_gguf_is_model_error(path: Path) -> Iterator[None]:
    """gguf's reader fails on a truncated or damaged file with whatever its parsing hits
    (struct.error, numpy's ValueError, IndexError...): one clear error instead."""
    import struct

    try:
        yield
    except (struct.error, ValueError, IndexError, KeyError, EOFError, OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: corrupt or truncated GGUF file, cannot read it ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); download it again") from None


def _gguf_header(path: Path) -> tuple[str, int, str | None]:
    """(general.architecture, block count, general.license or None) from the GGUF header, without
    parsing the vocabulary."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata  # transformers >= 5.2x: 20 ms
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # older: parses it all

        config = load_gguf_checkpoint(str(path))["config"]
        return config.get("model_type", "?"), int(config.get("num_hidden_layers", 0)), None  # licence unknown
    metadata, _ = read_gguf_metadata(str(path))
    arch, licence = str(metadata.get("general.architecture")), metadata.get("general.license")
    return arch, int(metadata.get(f"{arch}.block_count", 0)), str(licence) if licence else None


class _NameSkeleton:
    """What transformers' GGUF loader reads of `model_to_load`: the parameter names and depth.

    A real (meta) model works too, but the loader then rebuilds gguf's name table once per
    submodule (~400 times, ~20 s for SmolLM2); one flat level maps the same names.
    """

    def __init__(self, arch: str, num_layers: int):
        import torch
        import transformers

        config_cls, model_cls = (getattr(transformers, name) for name in GGUF_ARCHITECTURES[arch])
        self.config = config_cls(vocab_size=1, hidden_size=2, intermediate_size=1, num_attention_heads=1,
                                 num_key_value_heads=1, num_hidden_layers=num_layers,
                                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
        with torch.device("meta"):
            self._names = list(model_cls(self.config).state_dict())

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> list:
        return []


def _gguf_tokenizer(path: Path, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(out)
    _clean_tokenizer_config(out / "tokenizer_config.json")


def _clean_tokenizer_config(file: Path) -> None:
    """Drop loading-time flags transformers 5 writes into tokenizer_config.json."""
    data = json.loads(file.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        data.pop(key, None)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_folder(path: Path, progress: Progress) -> Source:
    from .model.loading import read_config_dict, read_state_dict

    config = read_config_dict(path)
    check_family(config.get("model_type"), path)
    if config.get("quantization_config"):
        raise ModelError(f"{path}: quantized checkpoints ({config['quantization_config'].get('quant_method')}) "
                         f"cannot be converted; use the full-precision checkpoint or a GGUF file")
    progress(f"Reading {path}...")
    generation = path / "generation_config.json"
    return Source("longllama" if config["model_type"] == "longllama" else "llama", path, config,
                  family_tensors(config["model_type"], read_state_dict(path)),
                  lambda out: _copy_tokenizer(path, out, progress),
                  generation if generation.is_file() else None, license=card_license(path))


def check_family(model_type: Any, path: Path) -> None:
    """ModelError naming what is missing unless `model_type` is one of FAMILIES."""
    if model_type in FAMILIES:
        return
    what = MISSING.get(model_type, "it is not one of the LLaMA-style families this converter knows")
    raise ModelError(f"{path}: model_type {model_type!r} cannot be converted: our model lacks {what}. "
                     f"Convertible: {', '.join(FAMILIES.values())}")


def family_tensors(model_type: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The source's tensors under our (HF LLaMA) names: StarCoder2 calls its MLP c_fc / c_proj."""
    if model_type != "starcoder2":
        return tensors
    names = {".mlp.c_fc.": ".mlp.up_proj.", ".mlp.c_proj.": ".mlp.down_proj."}
    renamed = {}
    for name, tensor in tensors.items():
        for old, new in names.items():
            name = name.replace(old, new)
        renamed[name] = tensor
    return renamed


def family_config(raw: dict[str, Any], window: int, path: Path) -> dict[str, Any]:
    """The source config's keys with its family's differences from LLaMA turned into our switches."""
    raw = dict(raw)
    model_type = raw.get("model_type", "llama")
    # Our windows are full attention: a sliding window is the same computation only if it covers them.
    sliding = raw.pop("sliding_window", None)
    if model_type == "qwen2" and not raw.pop("use_sliding_window", False):
        sliding = None
    if sliding is not None and sliding < window:
        raise ModelError(f"{path}: sliding_window {sliding} < window {window}: "
                         f"pass --window {sliding} (or less) to convert it")
    for key in ("use_sliding_window", "max_window_layers", "layer_types", "residual_dropout", "embedding_dropout"):
        raw.pop(key, None)
    if model_type == "qwen2":  # bias on q/k/v, none on o_proj
        raw.update(attention_bias=False, qkv_bias=True)
    elif model_type == "starcoder2":  # LayerNorms, GELU MLP without gate, biases everywhere
        use_bias = raw.pop("use_bias", True)
        raw.update(attention_bias=use_bias, mlp_bias=use_bias, norm_type="layer", mlp_type="plain",
                   rms_norm_eps=raw.pop("norm_epsilon", 1e-5))
        raw.setdefault("hidden_act", "gelu_pytorch_tanh")  # StarCoder2's default; a GGUF file does not say
    return raw


def _copy_tokenizer(src: Path, out: Path, progress: Progress) -> None:
    """Copy the tokenizer files; add a tokenizer.json to a SentencePiece-only one so that loading it
    later does not need sentencepiece."""
    from .model.loading import TOKENIZER_FILES

    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not ({"tokenizer.json", "tokenizer.model"} & set(copied)):
        progress(f"Note: {src} has no tokenizer (tokenizer.json or tokenizer.model); add one to the output")
        return
    for name in copied:
        shutil.copyfile(src / name, out / name)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if not config.get("tokenizer_class"):  # AutoTokenizer would look the class up by model_type "longllama"
        config["tokenizer_class"] = "LlamaTokenizer" if "tokenizer.model" in copied else "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if "tokenizer.json" not in copied:
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(out).backend_tokenizer.save(str(out / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - any failure just leaves the SentencePiece file
            progress(f"Note: kept the SentencePiece tokenizer.model only ({type(exc).__name__}); loading it "
                     f"needs `pip install sentencepiece protobuf`")


# ---------------------------------------------------------------------------------------------- config

def target_config(source: Source, mem_layers: Sequence[int] | None, mem_dtype: str | None,
                  last_context_length: int | None, dtype: str, window: int | None) -> LongLlamaConfig:
    """The LongLLaMA config for `source` with the requested memory settings (defaults: see convert)."""
    from .model.configuration_longllama import LongLlamaConfig

    raw = dict(source.config)
    src_window = int(raw.get("max_position_embeddings") or DEFAULT_WINDOW)
    if source.kind == "longllama":
        window = window or src_window
        mem_layers = raw.get("mem_layers", []) if mem_layers is None else mem_layers
        mem_dtype = mem_dtype or raw.get("mem_dtype") or "bfloat16"
        if last_context_length is None and window == src_window:
            last_context_length = raw.get("last_context_length")
    else:
        window = window or min(src_window, DEFAULT_WINDOW)
        mem_layers = default_mem_layers(int(raw["num_hidden_layers"])) if mem_layers is None else mem_layers
        mem_dtype = mem_dtype or "bfloat16"
    last_context_length = last_context_length or window // 2
    raw = family_config(raw, window, source.path)
    _pin_rope_context(raw, src_window)
    if mem_dtype not in MEM_DTYPES:
        raise ModelError(f"mem_dtype must be one of {', '.join(MEM_DTYPES)}, got {mem_dtype!r}")
    if not 1 <= last_context_length <= window:
        raise ModelError(f"last_context_length {last_context_length} must be within 1..window ({window})")
    kwargs = {k: v for k, v in raw.items() if k not in _DROP_CONFIG_KEYS}
    kwargs.update(max_position_embeddings=window, mem_layers=[int(i) for i in mem_layers], mem_dtype=mem_dtype,
                  last_context_length=last_context_length, architectures=["LongLlamaForCausalLM"], dtype=dtype)
    try:
        return LongLlamaConfig(**kwargs)
    except Exception as exc:  # strict-dataclass validation errors are not ValueErrors
        raise ModelError(f"{source.path}: cannot make a LongLLaMA config: {exc}") from None


def _pin_rope_context(raw: dict[str, Any], src_window: int) -> None:
    """llama3 / yarn / longrope scaling is computed against the pretraining context, which transformers
    takes from max_position_embeddings when the config does not say; convert sets max_position_embeddings
    to the window, so the source's value is written down first."""
    rope = raw.get("rope_scaling") or raw.get("rope_parameters")
    if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) in ("llama3", "yarn", "longrope"):
        rope.setdefault("original_max_position_embeddings", raw.get("original_max_position_embeddings", src_window))


# --------------------------------------------------------------------------------------------- writing

def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir() or not (out / "config.json").is_file():
        raise ModelError(f"{out} exists and is not a checkpoint folder; choose another --out")
    if not overwrite:
        raise ModelError(f"{out} already exists; pass --force to replace it")


@contextlib.contextmanager
def _atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a sibling temp folder; on success it replaces `out`, on any failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for file in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700, safetensors 0600: a cache may be shared
            os.chmod(file, 0o755 if file.is_dir() else 0o644)
        _check_out(out, overwrite)  # again: another process may have written it meanwhile
        if out.exists():
            old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> None:
    """safetensors in `dtype` (integer tensors kept), one file or shards + index; one shard in RAM at a time."""
    from safetensors.torch import save_file

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype) if t.is_floating_point() else t
        # A view into a larger (or shared) storage cannot be saved as is.
        return t.clone() if t.untyped_storage().nbytes() != t.nbytes or not t.is_contiguous() else t

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + nbytes(t) > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(t)
    if len(shards) == 1:
        save_file({n: cast(tensors[n]) for n in shards[0]}, folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: cast(tensors[n]) for n in names}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_generation_config(source: Source, config: LongLlamaConfig, folder: Path) -> None:
    if source.generation_config is not None:
        shutil.copyfile(source.generation_config, folder / "generation_config.json")
        return
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(folder)


def _provenance(source: Source, config: LongLlamaConfig) -> dict[str, Any]:
    return {
        "format": CONVERT_FORMAT,
        "source": str(source.path),
        "source_kind": source.kind,
        "hub_id": source.hub_id,
        "source_sha256": source_sha256(source.path),
        "source_max_position_embeddings": source.config.get("max_position_embeddings"),
        "source_model_type": source.config.get("model_type", "llama"),
        "source_license": source.license,
        "options": {"mem_layers": list(config.mem_layers), "mem_dtype": config.mem_dtype,
                    "window": config.max_position_embeddings, "last_context_length": config.last_context_length,
                    "dtype": str(config.dtype).removeprefix("torch.")},
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def card_license(path: Path) -> str | None:
    """The `license:` line of a checkpoint folder's model card (hub front matter), if any."""
    try:
        card = (path / MODEL_CARD).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    front = card.split("\n---", 1)[0] if card.startswith("---") else ""  # YAML front matter
    found = re.search(r"^license:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", front, flags=re.M)
    return found.group(1) if found else None


def write_model_card(folder: Path, name: str | None = None) -> None:
    """README.md of a converted folder: source, family, memory layers, the memory delta, licence.
    Rewritten when the folder changes (resolve.install_adapter adds the default delta)."""
    from .model.loading import PROVENANCE_NAME, find_adapter, memory_training

    prov = json.loads((folder / PROVENANCE_NAME).read_text(encoding="utf-8"))
    opts = prov["options"]
    source = prov.get("hub_id") or Path(prov["source"]).name
    trained = memory_training(folder)
    delta = (f"{trained}; applied by `load_model` and `from_pretrained`" if find_adapter(folder)
             else f"none{f' ({trained})' if trained else ''}")
    layers = ", ".join(map(str, opts["mem_layers"])) or "none"
    untrained = "" if trained or not opts["mem_layers"] else (
        "\nThe memory layers are not FoT-trained: with memory on, predictions get worse until they are "
        "(`longllama finetune`).\n")
    licence = prov.get("source_license")
    family = FAMILIES.get(prov.get("source_model_type", ""), prov.get("source_model_type"))
    card = f"""---
license: {licence or "other"}
tags: [longllama, focused-transformer]
---
# {name or folder.name}

LongLLaMA (Focused Transformer memory layers) made by `longllama convert` from **{source}** ({family}, \
{prov["source_kind"]} source, sha256 `{prov["source_sha256"][:16]}...`).

| | |
|---|---|
| memory layers (0-based) | {layers} |
| memory dtype | {opts["mem_dtype"]} |
| window | {opts["window"]} tokens (last {opts["last_context_length"]} kept as local context) |
| weights | {opts["dtype"]} safetensors |
| FoT memory delta | {delta} |
| licence | {licence or "unknown: see the source's licence, which applies to these weights"} |
{untrained}
Load it with one import (it registers model_type "longllama" with transformers' Auto classes):

```python
import longllama_lsp.model  # registers model_type "longllama"
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name or folder.name}")  # applies adapter.safetensors if present
tokenizer = AutoTokenizer.from_pretrained("{name or folder.name}")
```

Provenance: `{PROVENANCE_NAME}`.
"""
    (folder / MODEL_CARD).write_text(card, encoding="utf-8")


def source_sha256(path: Path) -> str:
    """sha256 of a GGUF file, or of a folder's config, weight and tokenizer files (name + content)."""
    from .model.loading import TOKENIZER_FILES, file_sha256, weight_files

    if path.is_file():
        return file_sha256(path)
    names = ["config.json", *(f.name for f in weight_files(path)), *(n for n in TOKENIZER_FILES if (path / n).is_file())]
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        digest.update(f"{name} {file_sha256(path / name)}\n".encode())
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    import torch

    from . import __version__

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"longllama_lsp": __version__, "python": platform.python_version(), "torch": torch.__version__,
            **{d: version(d) for d in ("transformers", "safetensors", "tokenizers", "gguf")}}


# ------------------------------------------------------------------------------------------------- hub

def is_hub_id(value: str) -> bool:
    """'owner/name' (not a path that merely does not exist yet, nor a .gguf file name)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value)) and not value.endswith(".gguf")


def download(repo_id: str, progress: Progress = _quiet) -> Path:
    """A hub snapshot folder (online only); ModelError that says to pass a local path otherwise."""
    progress(f"Downloading {repo_id} from the Hugging Face Hub...")
    try:
        from huggingface_hub import snapshot_download

        from .model.loading import TOKENIZER_FILES

        return Path(snapshot_download(repo_id, allow_patterns=[*HUB_PATTERNS, *TOKENIZER_FILES]))
    except Exception as exc:  # offline, DNS, 404, auth: the advice is the same
        raise ModelError(f"cannot download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}); we "
                         f"are probably offline. Pass a local checkpoint folder or GGUF file instead "
                         f"(--model PATH or LONGLLAMA_MODEL=PATH)") from None


# ------------------------------------------------------------------------------------------------- CLI

def _layers(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 8,16,24, got {text!r}") from None


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="GGUF file, checkpoint folder (LLaMA, Mistral, Qwen2, StarCoder2 or LongLLaMA), "
                                    "or hub id (online only)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output checkpoint folder")
    parser.add_argument("--mem-layers", type=_layers, default=None, metavar="I,J,K",
                        help="0-based memory layers, or 'none' (default: the source's for LongLLaMA, else every "
                             "(layers // 4)-th layer: 7,14,21 for SmolLM2's 30 layers)")
    parser.add_argument("--mem-dtype", choices=MEM_DTYPES, default=None,
                        help="storage dtype of memory keys/values (default: the source's, else bfloat16)")
    parser.add_argument("--window", type=int, default=None, metavar="TOKENS",
                        help=f"window = max_position_embeddings (default: the source's for LongLLaMA, else "
                             f"min(its context, {DEFAULT_WINDOW}) to keep CPU windows fast)")
    parser.add_argument("--last-context-length", type=int, default=None, metavar="TOKENS",
                        help="final tokens kept as local context instead of memory (default: window // 2)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype on disk (default float32)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is an existing checkpoint")


def run_convert(args: argparse.Namespace) -> int:
    """Progress on stderr, the output folder on stdout."""
    out = convert(args.src, args.out, mem_layers=args.mem_layers, mem_dtype=args.mem_dtype,
                  last_context_length=args.last_context_length, dtype=args.dtype, window=args.window,
                  overwrite=args.force, progress=print_to_stderr)
    print(out)
    return 0


cli = Command(add_convert_arguments, run_convert,
              description="Convert a GGUF file or a LLaMA / Mistral / Qwen2 / StarCoder2 / LongLLaMA checkpoint "
                          "into a LongLLaMA checkpoint folder (safetensors + tokenizer + config with memory "
                          "layers + a README.md model card).")
