"""A real byte-level BPE for chunker tests, trained once per process on stdlib sources (~1 s).

The production tokenizer (SmolLM2 from GGUF) is not available offline in tests; a byte-level BPE
trained on Python code behaves like it (whitespace runs, merges across identifiers), unlike a
whitespace split. See docs: /work/shared/reference/environment.md §5.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

STDLIB = Path(json.__file__).parent.parent  # e.g. ~/.pyenv/versions/3.11.7/lib/python3.11


def stdlib_texts(limit_chars: int) -> Iterator[str]:
    """UTF-8 .py files of the top-level stdlib, sorted, up to about `limit_chars` characters."""
    total = 0
    for path in sorted(STDLIB.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield text
        total += len(text)
        if total >= limit_chars:
            return


def tiny_tokenizer(folder: Path) -> None:
    """A 29-token letter-level tokenizer (<unk> <s> </s> a-z) saved in the HF layout, for tiny checkpoints."""
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


@functools.cache
def stdlib_tokenizer(vocab_size: int = 4096) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(1_500_000), trainer=trainer)
    return tok


def tokenizer_with(*tokens: str, bos: str | None = None, eos: str | None = None):
    """The stdlib BPE as a transformers tokenizer holding `tokens` as special tokens (e.g. FIM markers)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(stdlib_tokenizer().to_str())  # a copy: the trained one is cached per process
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    wrapped.add_special_tokens({"additional_special_tokens": [t for t in tokens if t not in (bos, eos)]})
    return wrapped


def fim_tokenizer(name: str):
    """The stdlib BPE with the FIM markers, stop tokens (and BOS) of the fim.TEMPLATES row `name`."""
    from longllama_lsp.fim import TEMPLATES

    t = next(t for t in TEMPLATES if t.name == name)
    bos = {"codellama": "<s>", "deepseek-coder": "<｜begin▁of▁sentence｜>"}.get(name)
    return tokenizer_with(*([bos] if bos else []), t.prefix, t.suffix, t.middle, *t.stops, bos=bos)


def count_tokens_fn() -> Callable[[str], int]:
    """`len(tok.encode(s))` in the shape production passes to chunk_file."""
    tok = stdlib_tokenizer()
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


# The special tokens each family's hub tokenizer has: (bos, eos, the fim.TEMPLATES row or None).
# Qwen2.5-Coder has no BOS; StarCoder2's BOS and EOS are one token.
FAMILY_SPECIALS = {"llama": ("<s>", "</s>", None), "mistral": ("<s>", "</s>", None),
                   "qwen2": (None, "<|endoftext|>", "qwen2.5-coder"),
                   "starcoder2": ("<|endoftext|>", "<|endoftext|>", "starcoder")}


def family_tokenizer(family: str):
    """The stdlib BPE with `family`'s BOS/EOS and FIM markers, as its hub tokenizer has them."""
    from longllama_lsp.fim import TEMPLATES

    bos, eos, fim = FAMILY_SPECIALS[family]
    t = next((t for t in TEMPLATES if t.name == fim), None)
    markers = (t.prefix, t.suffix, t.middle, *t.stops) if t else ()
    return tokenizer_with(*dict.fromkeys(m for m in (bos, eos, *markers) if m), bos=bos, eos=eos)
