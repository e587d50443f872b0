"""LongLLaMA configuration: a LLaMA config plus the Focused Transformer memory keys.

Every key of the published LongLLaMA checkpoints (syzymon/long_llama_3b, _3b_v1_1, _code_7b,
_code_7b_instruct) is a field here, so their config.json loads as is (spec §1.1, §1.2).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .memory import DEFAULT_BLOCK_SIZE

MEM_DTYPES = ("float32", "float16", "bfloat16")
NORM_TYPES = ("rms", "layer")
MLP_TYPES = ("gated", "plain")


@strict
class LongLlamaConfig(LlamaConfig):
    model_type = "longllama"

    # 0-based decoder layers that attend to memory; [] = plain LLaMA run in independent windows.
    mem_layers: list[int] | tuple[int, ...] = ()
    # Storage dtype of memory keys/values, cast back to the compute dtype inside attention.
    mem_dtype: str = "bfloat16"
    # True: RoPE in memory layers (local keys rotated, memory keys at position 0). False: no RoPE there.
    mem_positionals: bool = True
    # (heads, queries) tile of the memory-attention score matrix, to bound peak memory; None = one tile.
    mem_attention_grouping: list[int] | tuple[int, int] | None = None
    # Use torch's scaled_dot_product_attention for local+memory attention.
    torch_attention: bool = False
    # With gradient checkpointing on, checkpoint only layers whose index is a multiple of this.
    gradient_checkpoint_every_ith: int = 1
    # Final input tokens kept in the local (generation) cache rather than pushed to memory.
    last_context_length: int = 1024
    # Per query and head, attend only to the top-k memory keys (FoT's kNN; with block selection, of the
    # selected blocks' keys); None = every key (of the selection).
    mem_topk: int | None = None
    # Family switches (convert.py sets them; LLaMA's values are the defaults). qkv_bias: bias on the q/k/v
    # projections only (Qwen2); None = attention_bias, which puts it on all four (o_proj too).
    qkv_bias: bool | None = None
    # "rms": RMSNorm (LLaMA); "layer": LayerNorm with bias, eps = rms_norm_eps (StarCoder2).
    norm_type: str = "rms"
    # "gated": act(gate_proj(x)) * up_proj(x) -> down_proj (LLaMA); "plain": act(up_proj(x)) -> down_proj (StarCoder2).
    mlp_type: str = "gated"
    # Block-sparse memory: memory in blocks of mem_block_size slots, each with a min/max key summary;
    # when memory exceeds mem_budget tokens, each query tile attends to its top blocks within that
    # many tokens. None = dense (the reference); within the budget, dense as well.
    mem_block_size: int = DEFAULT_BLOCK_SIZE
    mem_budget: int | None = None

    def __post_init__(self, **kwargs):
        # rope_scaling (the older hub key, {"type": ...}) is turned into rope_parameters by LlamaConfig,
        # as transformers does for the same file; every rope_type it knows is computed by the model.
        self.mem_layers = [int(i) for i in self.mem_layers]
        if self.mem_attention_grouping is not None:
            self.mem_attention_grouping = tuple(int(x) for x in self.mem_attention_grouping)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        bad = [i for i in self.mem_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mem_layers {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype must be one of {MEM_DTYPES}, got {self.mem_dtype!r}")
        if self.mem_attention_grouping is not None and len(self.mem_attention_grouping) != 2:
            raise ValueError(f"mem_attention_grouping must be (heads, queries), got {self.mem_attention_grouping}")
        for name, value, allowed in (("norm_type", self.norm_type, NORM_TYPES), ("mlp_type", self.mlp_type, MLP_TYPES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        rope = self.rope_parameters or {}
        if rope.get("rope_type", "default") not in ("default", *ROPE_INIT_FUNCTIONS):
            raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (known: default, "
                             f"{', '.join(ROPE_INIT_FUNCTIONS)})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:  # our RoPE rotates the whole head
            raise ValueError(f"partial rotary embeddings (partial_rotary_factor {rope['partial_rotary_factor']}) "
                             f"are not supported")
        if self.mem_block_size < 1:
            raise ValueError(f"mem_block_size must be >= 1, got {self.mem_block_size}")
        if self.mem_budget is not None and self.mem_budget < self.mem_block_size:
            raise ValueError(f"mem_budget ({self.mem_budget}) must hold at least one block "
                             f"(mem_block_size {self.mem_block_size})")
        if self.last_context_length < 1:
            raise ValueError(f"last_context_length must be >= 1, got {self.last_context_length}")

    def select_memory_tokens(self, n: int) -> None:
        """Attend to the top memory blocks within n tokens (the server's memory.selectTokens; at least
        one block), or with n = 0 to every memory token (dense)."""
        self.mem_budget = max(n, self.mem_block_size) if n else None

    @property
    def attention_qkv_bias(self) -> bool:
        return self.attention_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))


# Named presets; "tiny" runs anywhere in milliseconds (tests), the others mirror published configs.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                 last_context_length=16, mem_layers=[1], mem_dtype="float32"),
    "long_llama_3b": dict(vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                          num_attention_heads=32, max_position_embeddings=2048, last_context_length=1024,
                          mem_layers=[6, 12, 18], mem_dtype="bfloat16", rms_norm_eps=1e-6,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "long_llama_code_7b": dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=4096,
                               last_context_length=3072, mem_layers=[8, 16, 24], mem_dtype="bfloat16",
                               rope_theta=1e6, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
