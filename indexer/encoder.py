"""Chunk texts -> memory: the model run up to its last memory layer, batched by length.

Each chunk is encoded after the end of the text before it in its file (its context: at most
indexer.schema.CONTEXT_CHARS, from a line start; no earlier memory), and only the chunk's own slots are kept. Its
memory is then valid wherever the same text follows the same context (after a rename, in another
file, on another branch): the memory key hashes both (`memory_key`). Encoded alone, a chunk's keys
miss what the code above defines or imports: on the skill eval's cross-file identifier tokens,
retrieved chunks encoded after their file's preceding 256 tokens gave NLL -19.5% / -14.9% against no
memory, alone -14.6% / -11.7% (bench/xid_encoding.py, BENCHMARKS stop 33). The reference encodes the
windows of one input one after another, so the later memory layers' keys of a window depend on the
memory before it (spec §2.5); `bench/bench_encoding.py` measures independent encoding against that.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from longllama_lsp.model.memory import MemCache, Memory


def contexts(texts: Sequence[str], chars: int) -> list[str]:
    """The context of each of a file's chunks (`texts`, consecutive, covering the file in order): the
    end of the text before it, at most `chars` characters, starting at a line start when the cut
    falls inside a line (a line's tail would tokenize unlike the line)."""
    out, before = [], ""
    for text in texts:
        out.append(context_before(before, chars))
        before = (before + text)[-(chars + 1):]  # one more: is the cut at a line start?
    return out


def context_before(text: str, chars: int) -> str:
    """The context of a chunk that follows `text` in its file: text's last `chars` characters at most,
    from a line start when the cut falls inside a line (also finetune.retrieval_data's rule)."""
    if chars <= 0:
        return ""
    if len(text) <= chars:
        return text
    cut = text[-chars:]
    if text[-chars - 1] == "\n":
        return cut
    newline = cut.find("\n")
    return cut[newline + 1:] if newline >= 0 else cut


def memory_key(content_hash: str, context: str) -> str:
    """What a chunk's memory is encoded from: its text (by content hash) after `context`. No context:
    the content hash itself, so memories encoded alone (every index before contexts) keep their keys."""
    if not context:
        return content_hash
    digest = hashlib.sha256(b"context\0" + context.encode("utf-8", "surrogatepass") + b"\0")
    digest.update(content_hash.encode())
    return digest.hexdigest()


def keyed(chunks: Sequence[Any], chars: int) -> list[tuple[Any, str]]:
    """A file's chunks (chunker.Chunk, in order) with their memory keys set, each with its context."""
    return [(dataclasses.replace(c, memory_key=memory_key(c.content_hash, ctx)), ctx)
            for c, ctx in zip(chunks, contexts([c.text for c in chunks], chars), strict=True)]


@dataclass
class EncodeStats:
    chunks: int = 0
    tokens: int = 0  # the chunks' own: what their memories hold
    context_tokens: int = 0  # encoded before them and dropped (Encoder.encode's contexts)
    seconds: float = 0.0


class Encoder:
    """Turns chunk texts into per-chunk Memory on the model's device.

    A batch holds rows of one token length only, so no row is padded: padding changes the rounding
    of the other rows' keys/values (attention reductions run over the padded width), and a chunk's
    cached memory must not depend on which chunks happened to be encoded with it (a rebuilt index
    equals an incrementally updated one, bit for bit). On CPU each chunk runs alone
    (`max_batch_rows=1`): batching is no faster there (bench/bench_index.py), and with several
    threads even equal-length batches round differently from single rows.
    batch_tokens bounds rows x length, which bounds activation memory.

    run_model(fn) runs fn() where the model may run: the engine's worker thread, its one owner, when
    the language server or the CLI indexes (longllama_lsp/workspace.py); by default right here.
    """

    def __init__(self, model, tokenizer, batch_tokens: int = 4096, max_chunk_tokens: int | None = None,
                 max_batch_rows: int | None = None, run_model: Callable[[Callable[[], Memory]], Memory] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.run_model = run_model or (lambda fn: fn())
        self.batch_tokens = batch_tokens
        self.max_chunk_tokens = max_chunk_tokens or model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.max_batch_rows = max_batch_rows or (1 if self.device.type == "cpu" else 1 << 30)
        self.stats = EncodeStats()

    def token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids[: self.max_chunk_tokens]

    def count_tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def encode(self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None,
               contexts: Sequence[str] | None = None) -> list[Memory]:
        """One Memory (B=1, M = the chunk's token count) per text, in the order given. With `contexts`
        (one per text), each text is encoded after its context, whose slots are then dropped."""
        ids = [self.token_ids(t) for t in texts]
        lead = [self.context_ids(c, len(i)) for c, i in zip(contexts, ids, strict=True)] if contexts \
            else [[] for _ in ids]
        rows = [(ctx + i) if i else [] for ctx, i in zip(lead, ids, strict=True)]  # an empty text: no context
        out: list[Memory | None] = [None] * len(ids)
        for batch in self._batches(rows):
            kept = [len(rows[i]) - len(ids[i]) for i in batch]  # where each chunk's own slots start
            for i, memory in zip(batch, self._encode_batch([rows[i] for i in batch], kept), strict=True):
                out[i] = memory
            if progress is not None:
                progress(len(batch), sum(len(ids[i]) for i in batch))
        return out  # type: ignore[return-value]

    def context_ids(self, context: str, chunk_tokens: int) -> list[int]:
        """The context's last tokens that fit the window beside a chunk of `chunk_tokens`."""
        room = self.max_chunk_tokens - chunk_tokens
        ids = self.tokenizer.encode(context, add_special_tokens=False) if context and room > 0 else []
        return ids[len(ids) - room:] if len(ids) > room else ids

    def _batches(self, ids: list[list[int]]) -> list[list[int]]:
        """Indices grouped by equal length (longest first), each group's size <= batch_tokens and rows."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        batches, current = [], []
        for i in order:
            n = len(ids[i])
            if current and (len(ids[current[0]]) != n or n * (len(current) + 1) > self.batch_tokens
                            or len(current) >= self.max_batch_rows):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def _encode_batch(self, rows: list[list[int]], kept: list[int]) -> list[Memory]:
        """Memories of the rows' slots from kept[b] on (a row's context tokens come before)."""
        t0 = time.perf_counter()
        lengths = [max(len(r), 1) for r in rows]
        width = max(lengths)
        pad = self.model.config.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T) right-padded
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            r = r or [pad]
            input_ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        # Rows have equal length (see _batches); only an empty text is padded, to one pad token.
        memory = self.run_model(lambda: self.model.encode_memory(input_ids.to(self.device),
                                                                 attention_mask=mask.to(self.device)))
        out = [Memory({i: MemCache(c.keys[b:b + 1, :, k:n].clone(), c.values[b:b + 1, :, k:n].clone(),
                                   torch.zeros(1, 1, n - k, 1, dtype=torch.float32, device=c.keys.device))
                       for i, c in memory.items()})
               for b, (k, n) in enumerate(zip(kept, lengths, strict=True))]  # keys (1, Hkv, n - k, D)
        self.stats.chunks += len(rows)
        self.stats.tokens += sum(n - k for k, n in zip(kept, lengths, strict=True))  # what the memories hold
        self.stats.context_tokens += sum(kept)
        self.stats.seconds += time.perf_counter() - t0
        return out


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` alone (no BOS): what a chunk's memory will hold, before the window's cut."""
    return len(tokenizer.encode(text, add_special_tokens=False))


class LazyEncoder:
    """An Encoder whose model loads on the first text that needs encoding.

    `longllama index` with nothing changed (or only deletions) never needs the model: the walk
    compares sizes and mtimes, and the store's fingerprint comes from the checkpoint files. Chunking
    needs only the tokenizer, loaded on the first changed file; `load_model()` returns the model.
    """

    def __init__(self, model_dir, load_model: Callable[[], Any], batch_tokens: int = 4096):
        self.model_dir, self._load_model, self.batch_tokens = model_dir, load_model, batch_tokens
        self._encoder: Encoder | None = None
        self._stats = EncodeStats()

    @functools.cached_property
    def max_chunk_tokens(self) -> int:
        """Read when a file is chunked: the config class imports transformers, which a no-op never needs."""
        from longllama_lsp.model.loading import load_config

        return load_config(self.model_dir).max_position_embeddings

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def stats(self) -> EncodeStats:
        return self._encoder.stats if self._encoder is not None else self._stats

    @functools.cached_property
    def tokenizer(self):
        """Loaded once, on the first file to chunk; the Encoder built later shares it."""
        from longllama_lsp.model.loading import load_tokenizer

        return load_tokenizer(self.model_dir)

    def count_tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def encode(self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None,
               contexts: Sequence[str] | None = None) -> list[Memory]:
        if self._encoder is None:
            self._encoder = Encoder(self._load_model(), self.tokenizer, self.batch_tokens, self.max_chunk_tokens)
        return self._encoder.encode(texts, progress, contexts)
