"""Our LongLLaMA model, registered with transformers' Auto classes under model_type "longllama"."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_longllama import PRESETS, LongLlamaConfig
from .memory import MemCache, Memory
from .modeling_longllama import LongLlamaCache, LongLlamaForCausalLM, LongLlamaModel, LongLlamaOutput

AutoConfig.register("longllama", LongLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "LongLlamaCache", "LongLlamaConfig", "LongLlamaForCausalLM", "LongLlamaModel",
           "LongLlamaOutput", "MemCache", "Memory"]
