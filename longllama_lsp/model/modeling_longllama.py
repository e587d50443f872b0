"""LongLLaMA: LLaMA with Focused Transformer memory layers, for any LLaMA-family checkpoint.

Inference follows the reference implementation exactly (spec §2): the input is cut into windows of
`max_position_embeddings` tokens; every window but the last `last_context_length` tokens passes
through the model with no local context carried over and leaves its (key, value) pairs in the
memory layers' memory; memory layers attend with one softmax to their local causal keys and all
memory keys (stored unrotated, i.e. at position 0). Parameter names are HF LLaMA's, so published
LongLLaMA checkpoints and plain LLaMA checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from .attention import Sparse, apply_rope, attend, rope_cos_sin, sdpa_attend
from .configuration_longllama import LongLlamaConfig
from .memory import MemCache, Memory

if TYPE_CHECKING:
    from .crossbatch import CrossBatch


@dataclass
class LocalCache:
    """One layer's local (generation) cache: keys/values (B, Hkv, L, D) before RoPE, positions (B, L).

    `rotated` keeps the keys after RoPE for the window base `base` (B, 1) (the smallest local
    position): the reference re-rotates every key at every step; while the base is unchanged the
    result is the same, so decoding rotates only the new token. `arena`, when set, is the storage
    these tensors are views of, with room to append (see _Arena).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    rotated: torch.Tensor | None = None
    base: torch.Tensor | None = None
    arena: _Arena | None = field(default=None, repr=False)

    @classmethod
    def build(cls, keys, values, positions, rotated=None, base=None) -> LocalCache:
        """A cache over these tensors, copied into an arena when appending in place is allowed."""
        if not _Arena.usable():
            return cls(keys, values, positions, rotated, base)
        arena = _Arena([keys, values, positions, rotated])
        return cls(*arena.views(), base, arena)

    def extend(self, keys, values, positions, rotated=None) -> LocalCache:
        """This cache plus t new tokens (keys/values (B, Hkv, t, D), positions (B, t), rotated keys
        (B, Hkv, t, D) when this cache keeps rotated keys). Written in place into the arena when this
        cache is its newest state and there is room; otherwise copied into a fresh arena."""
        n, t = self.keys.shape[2], keys.shape[2]
        new = [keys, values, positions, rotated if self.rotated is not None else None]
        if self.arena is not None and self.arena.can_append(n, t):
            return LocalCache(*self.arena.append(new), self.base, self.arena)
        old = [self.keys, self.values, self.positions, self.rotated]
        full = [None if a is None else torch.cat([a, b], dim=_Arena.seq_dim(a)) for a, b in zip(old, new, strict=True)]
        return LocalCache.build(*full, self.base)


class _Arena:
    """Storage for one layer's local cache with room after it along the sequence axis.

    Decoding appends one token per step; copying the whole cache with torch.cat at every step was
    ~30% of a CPU decode step at 900 cached tokens (SmolLM2-135M, profiled). Views handed out stay
    valid: only the cache whose length equals `length` (the newest one) may append, and it writes
    past every view already handed out. Any other holder (a cropped cache, a second continuation of
    the same cache) copies instead. Only without autograd: in-place writes would break the graph.
    """

    HEADROOM = 256  # tokens of spare room per (re)allocation: a session's cache costs this much extra

    def __init__(self, parts: list[torch.Tensor | None]):
        self.length = parts[0].shape[2]
        self.capacity = self.length + self.HEADROOM
        self.inference = torch.is_inference_mode_enabled()
        self.buffers = [None if p is None else self._spare(p) for p in parts]

    @staticmethod
    def usable() -> bool:
        return not torch.is_grad_enabled()

    @staticmethod
    def seq_dim(x: torch.Tensor) -> int:
        return 1 if x.dim() == 2 else 2  # positions (B, L); keys/values (B, Hkv, L, D)

    def _spare(self, part: torch.Tensor) -> torch.Tensor:
        dim = self.seq_dim(part)
        shape = list(part.shape)
        shape[dim] = self.capacity
        buf = part.new_empty(shape)  # (B, Hkv, capacity, D) or (B, capacity)
        buf.narrow(dim, 0, self.length).copy_(part)
        return buf

    def can_append(self, n: int, t: int) -> bool:
        return (self.length == n and n + t <= self.capacity and self.usable()
                and self.inference == torch.is_inference_mode_enabled())

    def append(self, parts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        t = parts[0].shape[2]
        for buf, part in zip(self.buffers, parts, strict=True):
            if buf is not None:
                buf.narrow(self.seq_dim(buf), self.length, t).copy_(part)
        self.length += t
        return self.views()

    def views(self) -> list[torch.Tensor | None]:
        return [None if b is None else b.narrow(self.seq_dim(b), 0, self.length) for b in self.buffers]


class LongLlamaCache:
    """What `past_key_values` holds: every layer's local cache, the local padding mask, and memory.

    The reference's 6-tuple per layer (spec §2.3) as an object: `layers[i]` is a LocalCache (or None
    before any token was cached), `key_mask` (B, L) is 1 for real tokens, `memory` maps memory layer
    -> MemCache. Assign `cache.memory` to swap the memory (it is an unordered bag).
    """

    # Read by transformers' GenerationMixin: this cache can be neither compiled nor rolled back a step.
    is_compileable = False
    is_croppable = False

    def __init__(self, layers: list[LocalCache | None], key_mask: torch.Tensor | None, memory: Memory):
        self.layers, self.key_mask, self.memory = layers, key_mask, memory

    @property
    def local_length(self) -> int:
        first = self.layers[0] if self.layers else None
        return 0 if first is None else first.keys.shape[2]

    def get_seq_length(self) -> int:
        return self.local_length

    def next_position(self) -> torch.Tensor:
        """(B, 1): one past the largest cached position (the reference's _prepare_pos_ids)."""
        return self.layers[0].positions.max(dim=-1, keepdim=True).values + 1

    def crop(self, length: int, reuse_storage: bool = False) -> None:
        """Keep the first `length` local tokens (prefix reuse after an edit).

        reuse_storage: the next tokens are written in place over the dropped ones instead of copying
        the kept ones first; only for the sole owner of this cache (the engine's per-document cache),
        since anything else holding a longer view of it would see those slots change.
        """
        for i, c in enumerate(self.layers):
            if c is not None:
                rotated = c.rotated[:, :, :length] if c.rotated is not None else None
                arena = c.arena if reuse_storage and c.arena is not None \
                    and c.arena.length == c.keys.shape[2] else None
                if arena is not None:
                    arena.length = length
                self.layers[i] = LocalCache(c.keys[:, :, :length], c.values[:, :, :length], c.positions[:, :length],
                                            rotated, c.base, arena)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :length]


@dataclass
class LongLlamaOutput:
    """A plain dataclass: transformers' ModelOutput renames past_key_values in v5."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: LongLlamaCache | None = None
    hidden_states: torch.Tensor | None = None
    # {memory layer: (B, M) attention mass on each memory slot, summed over heads and queries}
    memory_attention: dict[int, torch.Tensor] | None = None

    # transformers' GenerationMixin (v5) reads a model output as a mapping with the cache under "cache".
    _MAPPING_NAMES: ClassVar[dict[str, str]] = {"cache": "past_key_values"}

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, self._MAPPING_NAMES.get(key, key), None)
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return self.get(key)


@dataclass
class _Window:
    """What every layer of one window needs: positions, additive mask, cache and memory state."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    mask: torch.Tensor  # (B, 1, T, Lc+T) additive causal + padding mask over cached + new keys
    flush: bool  # the local cache overflows the window: move it to memory / drop it
    use_cache: bool
    crossbatch: CrossBatch | None = None
    want_memory_weights: bool = False
    no_padding: bool = False  # every key is a real token: plain layers may use SDPA's causal kernel
    rope_memo: dict = field(default_factory=dict)  # cos/sin shared by all layers of the window

    def rope(self, rope: Callable, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin (B, L, D) of the local positions rebased to 0, and the base (B, 1)."""
        key = (positions.shape[1], dtype)
        if key not in self.rope_memo:
            base = positions.min(dim=-1, keepdim=True).values
            self.rope_memo[key] = (*rope(positions - base, dtype), base)
        return self.rope_memo[key]


class LongLlamaAttention(nn.Module):
    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.is_memory_layer = layer_idx in config.mem_layers
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                     config.head_dim)
        self.uses_rope = not self.is_memory_layer or config.mem_positionals
        qkv_bias = config.attention_qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.mem_dtype = getattr(torch, config.mem_dtype)

    @property
    def sparse(self) -> Sparse | None:
        """Block-sparse memory settings (read per call: the config may be changed on a loaded model)."""
        budget = self.config.mem_budget
        return None if budget is None else Sparse(self.config.mem_block_size, budget)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        return q, k, v

    def memory_update(self, k: torch.Tensor, v: torch.Tensor, key_mask_row: torch.Tensor) -> MemCache:
        """Keys rotated "as if first" = unrotated (RoPE at 0 is the identity); mask (B, 1, T, 1)."""
        return MemCache(k.to(self.mem_dtype), v.to(self.mem_dtype), key_mask_row[..., None])

    def forward(self, x: torch.Tensor, w: _Window, rope: Callable, local: LocalCache | None,
                memory: MemCache | None):
        """x: (B, T, C). Returns (out (B, T, C), new local cache, new memory, memory attention)."""
        q, k, v = self.project(x)
        if w.crossbatch is not None and self.is_memory_layer:
            return self._crossbatch(q, k, v, w, rope), None, memory, None
        mask, positions = w.mask, w.positions
        # Reference: only a window with no local cache and no caching writes itself to memory.
        update = self.memory_update(k, v, mask[:, :, -1]) if self.is_memory_layer and local is None \
            and not w.use_cache else None
        past = None  # the local cache this window extends
        if local is not None:
            if w.flush:  # the whole previous local cache leaves: memory layers keep it in memory
                if self.is_memory_layer:
                    moved = self.memory_update(local.keys, local.values, mask[:, :, -1, :local.keys.shape[2]])
                    memory = moved if memory is None else MemCache.concat([memory, moved])
                mask = mask[..., local.keys.shape[2]:]
            else:
                past = local
                positions = torch.cat([local.positions, positions], dim=1)  # (B, L): small
        t = q.shape[2]
        cos = sin = base = None
        if self.uses_rope:
            cos, sin, base = w.rope(rope, positions, q.dtype)
            q = apply_rope(q, cos[:, -t:], sin[:, -t:])
        # Decoding (same window base): rotate only the new keys and append them to the cache, in place
        # when possible. Otherwise (first window, base moved) rotate every key, as the reference does.
        appendable = past is not None and (not self.uses_rope or (past.rotated is not None
                                                                   and torch.equal(past.base, base)))
        new_local = None
        if appendable:
            rotated_new = apply_rope(k, cos[:, -t:], sin[:, -t:]) if self.uses_rope else None
            grown = past.extend(k, v, positions[:, -t:], rotated_new)
            k, v = (grown.rotated if self.uses_rope else grown.keys), grown.values
            new_local = grown if w.use_cache else None
        else:
            if past is not None:
                k, v = torch.cat([past.keys, k], dim=2), torch.cat([past.values, v], dim=2)
            k_pre = k
            if self.uses_rope:
                k = apply_rope(k, cos, sin)
            if w.use_cache:
                new_local = LocalCache.build(k_pre, v, positions, k if self.uses_rope else None, base)
        memory_in = memory if self.is_memory_layer else None
        weights = None
        if not self.is_memory_layer:  # plain causal attention: torch's fused kernel
            causal = w.no_padding and k.shape[2] == q.shape[2]
            out = sdpa_attend(q, k, v, None if causal else mask, causal=causal)
        elif self.config.torch_attention and not w.want_memory_weights and not self.config.mem_topk \
                and not (self.sparse and self.sparse.applies(memory_in)):
            out = sdpa_attend(q, k, v, mask, memory_in)
        else:
            out, weights = attend(q, k, v, mask, memory_in, self.config.mem_attention_grouping,
                                  self.config.mem_topk, w.want_memory_weights and self.is_memory_layer,
                                  self.sparse)
        if update is not None:
            memory = update if memory is None else MemCache.concat([memory, update])
        return self._output(out), new_local, memory, weights

    def _crossbatch(self, q, k, v, w: _Window, rope) -> torch.Tensor:
        """FoT training (spec §3.2): previous rows' keys at position 0, own keys causal."""
        from .crossbatch import crossbatch_attention, visible_contexts
        k_mem = k
        if self.uses_rope:
            cos, sin, _ = w.rope(rope, w.positions, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cb = w.crossbatch
        visible = visible_contexts(q.shape[0], cb.range, cb.pack, cb.stepping).to(q.device)
        return self._output(crossbatch_attention(q, k, k_mem, v, visible, local_mask=w.mask))

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class PlainMLP(nn.Module):
    """StarCoder2's MLP, down_proj(act(up_proj(x))) (its c_fc/c_proj, renamed by convert)."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


def make_norm(config: LongLlamaConfig) -> nn.Module:
    if config.norm_type == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LongLlamaDecoderLayer(nn.Module):
    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LongLlamaAttention(config, layer_idx)
        self.mlp = PlainMLP(config) if config.mlp_type == "plain" else LlamaMLP(config)
        self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)

    def forward(self, x, w: _Window, rope, local, memory):
        h, new_local, memory, weights = self.self_attn(self.input_layernorm(x), w, rope, local, memory)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_local, memory, weights


class LongLlamaPreTrainedModel(PreTrainedModel):
    config_class = LongLlamaConfig
    config: LongLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongLlamaDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"decoder\.version"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LongLlamaModel):
            module.inv_freq.copy_(module.compute_inv_freq()[0])


class LongLlamaModel(LongLlamaPreTrainedModel):
    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([LongLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config)
        inv_freq, self.rope_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        rope_type = (self.config.rope_parameters or {}).get("rope_type", "default")
        if rope_type == "default":
            d = self.config.head_dim
            return 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0
        return ROPE_INIT_FUNCTIONS[rope_type](self.config, None)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, positions, dtype, self.rope_scaling)

    def forward_window(self, input_ids: torch.Tensor, w: _Window, local: list[LocalCache | None] | None,
                       memory: dict[int, MemCache], stop_after: int | None = None):
        """One window through the layers (all, or up to `stop_after`). Returns hidden, caches, memory."""
        x = self.embed_tokens(input_ids)  # (B, T, C)
        new_local, weights, memory = [], {}, dict(memory)
        for i, layer in enumerate(self.layers[: None if stop_after is None else stop_after + 1]):
            cache_i = local[i] if local is not None else None
            if self.gradient_checkpointing and self.training and i % self.config.gradient_checkpoint_every_ith == 0:
                # Non-reentrant: memory keys/values stay differentiable (the reference's recipe detaches them).
                x, c, m, a = checkpoint(layer, x, w, self.rope, cache_i, memory.get(i), use_reentrant=False)
            else:
                x, c, m, a = layer(x, w, self.rope, cache_i, memory.get(i))
            new_local.append(c)
            if m is not None:
                memory[i] = m
            if a is not None:
                weights[i] = a
        if stop_after is None:
            x = self.norm(x)
        return x, new_local, memory, weights


def _additive_mask(key_mask: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Lc+T) 1/0 key mask -> (B, 1, T, Lc+T): causal over the new T tokens plus padding."""
    b, total = key_mask.shape
    lo = torch.finfo(dtype).min
    past = total - t
    q_idx = torch.arange(t, device=key_mask.device)[:, None] + past
    k_idx = torch.arange(total, device=key_mask.device)[None, :]
    hidden = (k_idx > q_idx)[None, None] | (key_mask[:, None, None, :] == 0)
    return torch.zeros(b, 1, t, total, dtype=dtype, device=key_mask.device).masked_fill(hidden, lo)


class LongLlamaForCausalLM(LongLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.model = LongLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def window(self) -> int:
        """Window size (the reference's lctx = max_position_embeddings)."""
        return self.config.max_position_embeddings

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: LongLlamaCache | None = None,
                memory: Memory | None = None, use_cache: bool | None = None,
                last_context_length: int | None = None, labels: torch.LongTensor | None = None,
                crossbatch: CrossBatch | None = None, output_memory_attention: bool = False,
                logits_to_keep: int = 0, **_unused) -> LongLlamaOutput:
        """Logits for input_ids (B, T), with memory and local cache handled as the reference does.

        memory: initial memory (e.g. assembled from the index); must be None when past_key_values
        (which carries its own memory) is given. crossbatch: FoT training mode (memory layers attend
        to previous batch rows); input must fit one window.
        """
        if crossbatch is not None:
            return self._forward_crossbatch(input_ids, labels, crossbatch, attention_mask)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        lcl = self.config.last_context_length if last_context_length is None else last_context_length
        if past_key_values is not None and memory is not None:
            raise ValueError("pass memory either in past_key_values or as memory=, not both")
        b, t = input_ids.shape
        cache = past_key_values
        local = cache.layers if cache is not None and cache.local_length else None
        mem_state = dict(cache.memory if cache is not None else (memory or {}))
        n_cached = cache.local_length if local is not None else 0
        if position_ids is None:
            start = cache.next_position() if local is not None else torch.zeros(b, 1, dtype=torch.long,
                                                                                  device=input_ids.device)
            position_ids = torch.arange(t, device=input_ids.device)[None] + start
        key_mask = self._key_mask(attention_mask, cache if local is not None else None, b, n_cached + t,
                                  input_ids.device)
        hidden, weights = [], {}
        mem_len = max(t - lcl, 0)
        spans = [(s, min(s + self.window, mem_len)) for s in range(0, mem_len, self.window)] + [(mem_len, t)]
        for beg, end in spans:
            if beg == end and (beg, end) != spans[-1]:
                continue
            last = (beg, end) == spans[-1]
            window_cache = use_cache if (last or local is not None) else False
            h, local, mem_state, key_mask, w = self._run_window(
                input_ids[:, beg:end], position_ids[:, beg:end], key_mask, local, mem_state, window_cache,
                output_memory_attention, n_new_after=t - end)
            hidden.append(h)
            weights = w  # memory grows across windows: report the last window's attention
        hidden_states = torch.cat(hidden, dim=1)
        logits = self.lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)
        loss = self._lm_loss(logits, labels) if labels is not None else None
        new_cache = None
        if use_cache or mem_state:
            new_cache = LongLlamaCache(local if local is not None else [None] * len(self.model.layers),
                                       key_mask if local is not None else None, Memory(mem_state))
        return LongLlamaOutput(loss=loss, logits=logits, past_key_values=new_cache, hidden_states=hidden_states,
                               memory_attention=weights or None)

    def _key_mask(self, attention_mask, cache, b, total, device) -> torch.Tensor:
        """(B, Lc+T) 1/0 mask over cached + new tokens (the reference slices the caller's full mask)."""
        if attention_mask is not None:
            if attention_mask.shape[-1] < total:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {total} "
                                 "(local cache + input)")
            return attention_mask[:, -total:].to(device)
        mask = torch.ones(b, total, dtype=torch.long, device=device)
        if cache is not None and cache.key_mask is not None:
            mask[:, : cache.key_mask.shape[1]] = cache.key_mask
        return mask

    def _run_window(self, ids, positions, key_mask, local, mem_state, use_cache, want_weights, n_new_after):
        """One window; key_mask spans (cached + all remaining input). Returns the rolled state."""
        t = ids.shape[1]
        n_cached = local[0].keys.shape[2] if local is not None and local[0] is not None else 0
        window_mask = key_mask[:, : n_cached + t]
        flush = local is not None and n_cached + t > self.window
        w = _Window(positions=positions, mask=_additive_mask(window_mask, t, self.dtype), flush=flush,
                    use_cache=use_cache, want_memory_weights=want_weights, no_padding=bool(window_mask.all()))
        h, new_local, mem_state, weights = self.model.forward_window(ids, w, local, mem_state)
        kept = t if flush else n_cached + t  # local tokens after this window
        rest = key_mask[:, n_cached + t:]  # mask of the input still to come
        key_mask = torch.cat([window_mask[:, -kept:] if use_cache else window_mask[:, :0], rest], dim=1)
        return h, (new_local if use_cache else None), mem_state, key_mask, weights

    def _forward_crossbatch(self, input_ids, labels, crossbatch: CrossBatch, attention_mask=None):
        b, t = input_ids.shape
        if t > self.window:
            raise ValueError(f"crossbatch rows must fit one window ({self.window} tokens), got {t}")
        key_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        positions = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        w = _Window(positions=positions, mask=_additive_mask(key_mask, t, self.dtype), flush=False,
                    use_cache=False, crossbatch=crossbatch)
        h, _, _, _ = self.model.forward_window(input_ids, w, None, {})
        logits = self.lm_head(h)
        return LongLlamaOutput(loss=self._lm_loss(logits, labels) if labels is not None else None, logits=logits)

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)

    @torch.inference_mode()
    def encode_memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      memory: Memory | None = None) -> Memory:
        """The memory (keys, values per memory layer) that `input_ids` (B, T) leaves behind.

        Runs only up to the last memory layer (no LM head). Windows of T > window are encoded one
        after another as the reference does. With `memory`, the chunk is encoded after that memory
        (sequential encoding) and only the chunk's own part is returned.
        """
        if not self.config.mem_layers:
            raise ValueError("this model has no memory layers (mem_layers is empty)")
        b, t = input_ids.shape
        key_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        start = memory.num_tokens if memory is not None else 0
        state = dict(memory or {})
        for beg in range(0, t, self.window):
            end = min(beg + self.window, t)
            positions = torch.arange(beg, end, device=input_ids.device)[None].expand(b, -1)
            w = _Window(positions=positions, mask=_additive_mask(key_mask[:, beg:end], end - beg, self.dtype),
                        flush=False, use_cache=False, no_padding=bool(key_mask[:, beg:end].all()))
            _, _, state, _ = self.model.forward_window(input_ids[:, beg:end], w, None, state,
                                                       stop_after=max(self.config.mem_layers))
        return Memory({i: MemCache(c.keys[:, :, start:], c.values[:, :, start:], c.mask[:, :, start:])
                       for i, c in state.items()})

    # ------------------------------------------------------------- transformers' GenerationMixin
    # `generate` is transformers' own (every standard argument works: generation_config, streamer,
    # stopping_criteria, logits_processor, sampling); repository memory is a model kwarg:
    # model.generate(ids, memory=memory, max_new_tokens=32). These hooks make one step's forward
    # arguments exactly as the reference's decoding: the whole prompt (with the memory) first, then
    # one new token at a time on the LongLlamaCache (whose overflow moves to memory, spec §2.3).

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward returns its own LongLlamaCache; a DynamicCache made for it would be ignored

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: LongLlamaCache | None = None,
                                      attention_mask: torch.Tensor | None = None, memory: Memory | None = None,
                                      **kwargs) -> dict[str, Any]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # transformers 5.17 hands the running cache over as past_key_values, 5.25 as `cache`: take
        # either (under the old name each step went out as a prompt, with memory beside the cache)
        past = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else past
        # Positions count real tokens, as the reference's prepare_inputs_for_generation (left pads get -1).
        positions = attention_mask.long().cumsum(-1) - 1  # (B, T)
        kwargs.pop("position_ids", None)
        kwargs.pop("is_first_iteration", None)
        step: dict[str, Any] = dict(attention_mask=attention_mask, **kwargs)
        if cache is None or not kwargs.get("use_cache", True):  # the prompt, or a recompute without a cache
            return {**step, "input_ids": input_ids, "position_ids": positions, "memory": memory}
        n = next_sequence_length or 1  # new tokens past the cache
        return {**step, "input_ids": input_ids[:, -n:], "position_ids": positions[:, -n:], "past_key_values": cache}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, adapter: bool = True, **kwargs):
        """transformers' from_pretrained, plus the folder's adapter.safetensors (the FoT-trained memory
        delta that `longllama convert` and `longllama finetune` ship), as loading.load_model applies it.
        adapter=False loads the weights without it."""
        from .loading import apply_weight_delta, find_adapter

        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        file = find_adapter(pretrained_model_name_or_path) if adapter and Path(
            pretrained_model_name_or_path).is_dir() else None
        if file is not None:
            apply_weight_delta(model, file)
        return model
