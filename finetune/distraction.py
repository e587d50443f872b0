"""Helpers for the distraction benchmark (bench/bench_distraction.py, issue #5): the FoT paper's
"distraction issue" at small scale.

    RemappedTokenizer   a real tokenizer restricted to its K most frequent ids on the training
                        data (the rest -> one <unk> id), so a small model's LM head stays cheap on CPU
    chunk_windows       (document, chunk) windows that have a full previous chunk (the "own" memory)
    distractor_plan     per scored window, the distractor documents it sees (nested: the first 8 of
                        the 64), the same for every model
    stack_rows          batch-stack one-row memories (equal or padded lengths) for a batched forward
    window_nll          per-window summed NLL of a batch of windows under a (per-row) memory
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch


class RemappedTokenizer:
    """`base` tokenizer whose ids are renumbered 0..K-1 (frequent ids kept), others -> `unk_token_id`.

    Enough of the tokenizer interface for finetune.data (encode, bos/eos ids) and for decoding.
    New id layout: 0 = <unk>, then `keep` in order (specials first by construction in `from_counts`).
    """

    def __init__(self, base: Any, keep: Sequence[int]):
        self.base = base
        self.keep = list(keep)
        if len(set(self.keep)) != len(self.keep):
            raise ValueError("keep ids must be unique")
        self.unk_token_id = 0
        self.new_of = {old: i + 1 for i, old in enumerate(self.keep)}
        self.old_of = [None] + self.keep
        self.bos_token_id = self.new_of.get(base.bos_token_id)
        self.eos_token_id = self.new_of.get(base.eos_token_id)
        pad = getattr(base, "pad_token_id", None)
        self.pad_token_id = self.new_of.get(pad) if pad is not None else self.eos_token_id

    @classmethod
    def from_counts(cls, base: Any, counts: collections.Counter, k: int) -> RemappedTokenizer:
        """K-1 ids: base specials (bos, eos, pad) then the most frequent ids of `counts`."""
        specials = [i for i in (base.bos_token_id, base.eos_token_id, getattr(base, "pad_token_id", None))
                    if i is not None]
        keep = list(dict.fromkeys(specials))
        for i, _ in counts.most_common():
            if len(keep) >= k - 1:
                break
            if i not in keep:
                keep.append(i)
        return cls(base, keep)

    def __len__(self) -> int:
        return len(self.keep) + 1

    @property
    def vocab_size(self) -> int:
        return len(self)

    def map_ids(self, ids: Iterable[int]) -> list[int]:
        return [self.new_of.get(int(i), self.unk_token_id) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.base.encode(text, add_special_tokens=add_special_tokens)
        return self.map_ids(getattr(ids, "ids", ids))

    def decode(self, ids: Iterable[int]) -> str:
        return self.base.decode([self.old_of[int(i)] for i in ids if int(i) != self.unk_token_id])


def count_tokens(base: Any, texts: Iterable[str]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for text in texts:
        ids = base.encode(text, add_special_tokens=False)
        counts.update(getattr(ids, "ids", ids))
    return counts


def chunk_windows(docs: Sequence[Sequence[int]], t: int) -> list[tuple[int, int]]:
    """(doc, chunk) with chunk >= 1 where both that chunk and the previous one hold t full tokens."""
    return [(d, c) for d, toks in enumerate(docs) for c in range(1, len(toks) // t)]


def distractor_plan(n_windows: int, pool_size: int, n: int, seed: int, exclude: Sequence[int | None] = ()
                    ) -> list[list[int]]:
    """Per window, `n` distinct pool indices (seeded by (seed, window)); smaller counts use a prefix.

    exclude[w]: a pool index window w must not see (its own document, if it is in the pool).
    """
    out = []
    for w in range(n_windows):
        banned = exclude[w] if w < len(exclude) else None
        choices = [p for p in range(pool_size) if p != banned]
        if len(choices) < n:
            raise ValueError(f"distractor pool of {len(choices)} documents is smaller than {n}")
        out.append(random.Random(f"{seed}:{w}").sample(choices, n))
    return out


def stack_rows(rows: Sequence[Any]):
    """One Memory with B = len(rows) from one-row Memories; shorter rows are right-padded and masked."""
    from longllama_lsp.model import MemCache, Memory
    from longllama_lsp.model.memory import MASK_MIN

    if not rows:
        raise ValueError("no memory rows")
    m = max(r.num_tokens for r in rows)
    layers = list(rows[0])
    out = {}
    for i in layers:
        keys, values, masks = [], [], []
        for r in rows:
            c = r[i]
            if c.keys.shape[0] != 1:
                raise ValueError(f"stack_rows takes one-row memories, got batch {c.keys.shape[0]}")
            pad = m - c.num_tokens
            keys.append(torch.nn.functional.pad(c.keys, (0, 0, 0, pad)))
            values.append(torch.nn.functional.pad(c.values, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(c.mask, (0, 0, 0, pad), value=MASK_MIN))
        out[i] = MemCache(torch.cat(keys), torch.cat(values), torch.cat(masks))
    return Memory(out)


@torch.no_grad()
def window_nll(model: Any, windows: torch.Tensor, memory: Any = None) -> torch.Tensor:
    """(B,) summed next-token NLL of full windows (B, T) scored as the local context (first token is
    context only), with `memory` (B rows, or None)."""
    ids = windows.to(model.device)
    out = model(ids, memory=memory, use_cache=True, last_context_length=ids.shape[1])
    logits = out.logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.sum(dim=1).double().cpu()
