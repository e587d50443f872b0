"""The one way every command loads the model: resolve the checkpoint, pick device and dtype, load.

    model, tokenizer, model_dir = load_model_and_tokenizer(args.model, args.device, args.dtype)

Used by the engine (`longllama serve / ask / complete`), `longllama index / watch` and the training
commands (`finetune`, `eval`, `train`, which build on `resolve_device_dtype` and `resolve_model`).
model/loading.py reads the files; resolve.py finds (and converts on first use) the checkpoint, or
builds one from a weight delta (`longllama finetune`'s output) on its base.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def resolve_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[str, torch.dtype]:
    """(device, compute dtype): cuda when present, else cpu; float32 on cpu, bfloat16 elsewhere."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    return device, torch_dtype


def load_model_and_tokenizer(model_path: str | os.PathLike | None = None, device: str | None = None,
                             dtype: str | None = None, config_value: str | None = None,
                             decode_dtype: str | None = None, decoding: bool = True) -> tuple[Any, Any, Path]:
    """(model in eval mode, tokenizer, checkpoint folder): --model, the model.path setting,
    $LONGLLAMA_MODEL or the bundled SmolLM2, converted on first use (resolve.py).

    decode_dtype: weights for steps of a few tokens (model/decode_weights.py). None: bfloat16 copies
    when the model runs in float32 on a CPU, else none. decoding=False (commands that only encode):
    no copies.
    """
    from .model.loading import load_tokenizer

    model, path = load_resolved_model(model_path, device, dtype, config_value, decode_dtype, decoding)
    return model, load_tokenizer(path), path


def load_resolved_model(model_path: str | os.PathLike | None = None, device: str | None = None,
                        dtype: str | None = None, config_value: str | None = None,
                        decode_dtype: str | None = None, decoding: bool = True) -> tuple[Any, Path]:
    """`load_model_and_tokenizer` without the tokenizer, for a caller that has it already (the
    indexer's LazyEncoder, which chunked files before the model was needed)."""
    import torch

    from .model.decode_weights import add_decode_weights
    from .model.loading import load_model
    from .resolve import resolve_model

    device, torch_dtype = resolve_device_dtype(device, dtype)
    path = resolve_model(explicit=str(model_path) if model_path else None, config_value=config_value)
    model = load_model(path, device=device, dtype=torch_dtype).eval()
    decode = decode_dtype or ("bfloat16" if device == "cpu" and torch_dtype == torch.float32 else None)
    if decoding and decode is not None and getattr(torch, decode) != torch_dtype:
        added = add_decode_weights(model, getattr(torch, decode))
        logger.info("decode steps use %s weight copies (+%.0f MB)", decode, added / 2**20)
    return model, Path(path)
