"""kNN-LM over a completion's or an answer's memory (Khandelwal et al. 2020): the tokens that followed the
memory slots most like the newest position vote beside the model at every decode step.

    p = (1 - weight) p_model + weight p_knn,   p_knn(v) = sum over the K nearest slots s whose next token is v
        of softmax_s(-d_s / (T d_1)),   d = squared L2 distance between states, d_1 the nearest's

A slot's state is what the index already keeps for it: the last memory layer's key and value (its k_proj and
v_proj outputs, unrotated), concatenated. The newest position's state comes from the same projections while
decoding (`QueryProbe`), so the lookup costs no storage and no encoding beyond the memory's own. The
datastore is the memory the completion attends to (its visible slots whose next token is known:
`Assembled.next_ids`), so it is what retrieval picked for the code before the cursor plus the open file.

Why: on names another file defines, the model alone rarely gets the first token right; the slots where the
same name was used elsewhere say what came next there. BENCHMARKS.md "Stop 43" has the measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .model.memory import Memory

# K and T of bench/knn's grid (setting B of BENCHMARKS "Stop 42"): many neighbours, a sharp temperature.
NEIGHBOURS = 256
TEMPERATURE = 0.25
# A memory with more visible slots gets no lookup: memory.retrieveTokens 0 over a large repository would make
# the datastore a float32 copy of every slot (1.5 GB at 1M tokens) and read every chunk's text for next_ids.
# Retrieval's memory (4,096 tokens of other files plus the open file's chunks) holds ~4-10k.
MAX_TOKENS = 1 << 16


def following(ids: Sequence[int]) -> torch.Tensor:
    """(len(ids),) int64: the token after each slot of a chunk holding `ids`, -1 at its last (next_ids' rows)."""
    return torch.tensor([*ids[1:], -1], dtype=torch.int64)


@dataclass
class Datastore:
    """Memory slots whose next token is known: states (N, S) float32 (S = 2 Hkv D), next ids (N,) int64."""

    states: torch.Tensor
    next_ids: torch.Tensor

    def __post_init__(self) -> None:
        self.norms = (self.states * self.states).sum(-1)  # (N,)

    @classmethod
    def of(cls, memory: Memory, next_ids: torch.Tensor, layer: int) -> Datastore | None:
        """The slots of `memory` at `layer` with a next token (next_ids (M,): -1 where unknown or hidden, as
        Assembler sets them for the visible slots only); None if none."""
        cache = memory[layer]
        next_ids = next_ids.to(cache.keys.device)
        rows = (next_ids >= 0).nonzero()[:, 0]  # (N,)
        if not len(rows):
            return None
        keys = cache.keys[0][:, rows].transpose(0, 1).flatten(1)  # (N, Hkv * D)
        values = cache.values[0][:, rows].transpose(0, 1).flatten(1)  # (N, Hkv * D)
        return cls(torch.cat([keys, values], -1).float(), next_ids[rows])

    def __len__(self) -> int:
        return len(self.next_ids)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For states (Q, S): the squared distances (Q, K) of the K nearest slots, nearest first, and their next
        ids (Q, K)."""
        queries = queries.to(self.states.device, torch.float32)
        dist = self.norms - 2 * (queries @ self.states.T) + (queries * queries).sum(-1, keepdim=True)  # (Q, N)
        dist, rows = dist.topk(min(NEIGHBOURS, len(self)), largest=False)  # (Q, K)
        return dist, self.next_ids[rows]

    def mix(self, logits: torch.Tensor, query: torch.Tensor, weight: float) -> torch.Tensor:
        """log((1 - weight) p_model + weight p_knn) (V,) for the model's logits (V,) and the newest state (S,)."""
        logp = torch.log_softmax(logits.float(), -1)
        dist, next_ids = self.nearest(query[None])
        return mixture(logp[None], dist.to(logp.device), next_ids.to(logp.device), weight, TEMPERATURE)[0]


def mixture(logp: torch.Tensor, dist: torch.Tensor, next_ids: torch.Tensor, weight: float,
            temperature: float) -> torch.Tensor:
    """log((1 - weight) p_model + weight p_knn) (Q, V), for model log-probs (Q, V) and each query's nearest
    slots, nearest first: their distances and next ids (Q, K)."""
    vote = torch.softmax(-dist / (temperature * dist[:, :1].clamp_min(1e-6)), -1)  # (Q, K)
    p_knn = torch.zeros_like(logp).scatter_add_(1, next_ids, vote)  # (Q, V)
    return torch.logaddexp(logp + torch.log1p(torch.tensor(-weight)), torch.log(weight * p_knn + 1e-30))


class QueryProbe:
    """The newest position's state at memory layer `layer` in the model's latest forward (`state()`): its
    k_proj and v_proj outputs, caught by forward hooks registered once for the model's lifetime. Every
    forward of the model passes them (memory encoding too); the decoder reads them right after its step,
    on the worker thread that owns the model."""

    def __init__(self, model: Any, layer: int):
        attention = model.model.layers[layer].self_attn
        self._parts: dict[str, torch.Tensor] = {}
        for name in ("k", "v"):
            getattr(attention, f"{name}_proj").register_forward_hook(
                lambda _module, _inputs, out, name=name: self._parts.__setitem__(name, out))

    def state(self) -> torch.Tensor:
        """(S,) = (2 Hkv D,): the last position's key then value projection, as Datastore's rows. Sliced before
        the concatenation: a decode step reads one position, not the prefill step's every one."""
        return self.states(slice(-1, None))[0]

    def states(self, positions: slice = slice(None)) -> torch.Tensor:
        """(T, S): `positions` (all by default: what `longllama eval` scores) of the latest forward's first row."""
        return torch.cat([self._parts["k"][0, positions], self._parts["v"][0, positions]], -1).detach()


@dataclass
class Knn:
    """One completion's lookup: its datastore, the probe that reads the model's state, the mixture weight."""

    datastore: Datastore
    probe: QueryProbe
    weight: float

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The newest step's logits (V,) -> mixed log-probabilities (V,)."""
        return self.datastore.mix(logits, self.probe.state(), self.weight)
