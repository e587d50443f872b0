"""Our LongLLaMA model, registered with transformers' Auto classes under model_type "longllama".

`import longllama_lsp.model` registers it (what `AutoModelForCausalLM.from_pretrained` users rely
on, see the model card convert.py writes). The `longllama` CLI defers that (it sets
`longllama_lsp.defer_model_registration` before its first import): its fast paths (`--help`, a
no-op `index`, `status`) import submodules such as `.memory` and `.loading` for tensors and
checkpoint metadata, and transformers alone costs seconds. Deferred, the classes below load, and
register, on first attribute access; `loading.load_tokenizer` registers the config for AutoTokenizer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configuration_longllama import PRESETS, LongLlamaConfig
    from .memory import MemCache, Memory
    from .modeling_longllama import LongLlamaCache, LongLlamaForCausalLM, LongLlamaModel, LongLlamaOutput

_LAZY = {"PRESETS": ".configuration_longllama", "LongLlamaConfig": ".configuration_longllama",
         "MemCache": ".memory", "Memory": ".memory", "LongLlamaCache": ".modeling_longllama",
         "LongLlamaForCausalLM": ".modeling_longllama", "LongLlamaModel": ".modeling_longllama",
         "LongLlamaOutput": ".modeling_longllama"}

__all__ = ["PRESETS", "LongLlamaCache", "LongLlamaConfig", "LongLlamaForCausalLM", "LongLlamaModel",  # noqa: F822
           "LongLlamaOutput", "MemCache", "Memory"]  # (loaded by __getattr__)


def register_config() -> None:
    """Register LongLlamaConfig with AutoConfig (idempotent): what AutoTokenizer needs to read our
    config.json without warning about an unknown model type."""
    from transformers import AutoConfig

    from .configuration_longllama import LongLlamaConfig

    AutoConfig.register("longllama", LongLlamaConfig, exist_ok=True)


def register() -> None:
    """Register LongLlamaConfig and LongLlamaForCausalLM with transformers' Auto classes (idempotent)."""
    from transformers import AutoModelForCausalLM

    from .configuration_longllama import LongLlamaConfig
    from .modeling_longllama import LongLlamaForCausalLM

    register_config()
    AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    if _LAZY[name] != ".memory":
        register()  # the model classes are loaded now: registering costs nothing more
    globals()[name] = value
    return value


import longllama_lsp  # noqa: E402  (the parent package, imported already)

if not longllama_lsp.defer_model_registration:
    register()
