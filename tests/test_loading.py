"""Checkpoint loading: published LongLLaMA layouts, bad checkpoints, tokenizers, fingerprints, adapters.

Test Data: tests/fixtures/longllama-tiny (the published LongLLaMA layout: HF LLaMA names, untied
lm_head, mem_layers [1, 3]), copied into tmp folders as .bin / sharded variants;
/work/shared/reference/tokenizers/openllama_v{1,2}.model (OpenLLaMA SentencePiece tokenizers).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, SHARED
from helpers_models import make_tiny
from safetensors.torch import load_file, save_file

from longllama_lsp.errors import CheckpointError, ModelError
from longllama_lsp.model import LongLlamaForCausalLM, loading
from longllama_lsp.model.loading import (
    PROVENANCE_NAME,
    apply_weight_delta,
    fingerprint_details,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    read_state_dict,
)

ATOL = 1e-5
# What syzymon/long_llama_* config.json files carry so that trust_remote_code finds their code.
AUTO_MAP = {"AutoConfig": "configuration_longllama.LongLlamaConfig",
            "AutoModel": "modeling_longllama.LongLlamaModel",
            "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM"}
TOKENIZERS = SHARED / "reference" / "tokenizers"


def golden_state() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "model.safetensors")


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], layout: str = "safetensors",
                     config_edit: dict | None = None) -> Path:
    """The golden config (+ auto_map, as published) with `state` saved in `layout`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((GOLDEN / "config.json").read_text())
    config.update({"auto_map": AUTO_MAP, **(config_edit or {})})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(state)
    halves = {f"{layout}-1": names[: len(names) // 2], f"{layout}-2": names[len(names) // 2:]}
    if layout == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout in ("safetensors-sharded", "bin-sharded"):
        ext, index = ("safetensors", "model.safetensors.index.json") if layout.startswith("safetensors") else \
            ("bin", "pytorch_model.bin.index.json")
        stem = "model" if ext == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, part in enumerate(halves.values(), 1):
            file = f"{stem}-{i:05d}-of-00002.{ext}"
            shard = {n: state[n] for n in part}
            save_file(shard, folder / file, metadata={"format": "pt"}) if ext == "safetensors" else \
                torch.save(shard, folder / file)
            weight_map.update(dict.fromkeys(part, file))
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise AssertionError(layout)
    return folder


# ------------------------------------------------------------------------------------- published layouts

@pytest.mark.parametrize("layout", ["safetensors", "bin", "safetensors-sharded", "bin-sharded"])
@torch.no_grad()
def test_published_layouts_load_and_match_golden(tmp_path, layout, golden_cases):
    folder = write_checkpoint(tmp_path / layout, golden_state(), layout)
    model = load_model(folder)
    assert isinstance(model, LongLlamaForCausalLM) and not model.training
    assert model.config.mem_layers == [1, 3] and model.config.last_context_length == 16
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied, as published
    logits = model(golden_cases["A.input_ids"]).logits
    assert (logits - golden_cases["A.logits"]).abs().max() < ATOL


@pytest.mark.parametrize("layout", ["bin", "safetensors-sharded"])
@torch.no_grad()
def test_published_layout_loads_through_automodel_without_remote_code(tmp_path, layout, golden_cases):
    from transformers import AutoModelForCausalLM

    folder = write_checkpoint(tmp_path / layout, golden_state(), layout)
    model = AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code: our registered class
    assert type(model) is LongLlamaForCausalLM
    logits = model.eval()(golden_cases["A.input_ids"]).logits
    assert (logits - golden_cases["A.logits"]).abs().max() < ATOL


def test_bfloat16_bin_loads_in_requested_dtype(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in golden_state().items()}
    folder = write_checkpoint(tmp_path / "bf16", state, "bin")
    model = load_model(folder, dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"].float())
    assert model.model.inv_freq.dtype == torch.float32 and not model.model.inv_freq.is_meta


def test_plain_llama_config_loads_without_memory(tmp_path):
    folder = write_checkpoint(tmp_path / "llama", golden_state(), config_edit={"model_type": "llama"})
    assert load_config(folder).mem_layers == []
    assert load_model(folder).config.mem_layers == []


def test_tied_checkpoint_without_lm_head(tmp_path):
    model = make_tiny()  # tie_word_embeddings=True
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randint(0, 99, (1, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=ATOL)


def test_stale_rotary_buffers_are_ignored(tmp_path):
    state = golden_state()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # transformers < 4.31 saved these
    load_model(write_checkpoint(tmp_path, state))


# ------------------------------------------------------------------------------------- bad checkpoints

def test_missing_key(tmp_path):
    state = golden_state()
    del state["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing keys \(model\.norm\.weight\)"):
        load_model(write_checkpoint(tmp_path, state))


def test_wrong_shape_names_expected_and_actual(tmp_path):
    state = golden_state()
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(10, 64)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight: expected \(172, 64\), "
                                              r"got \(10, 64\)"):
        load_model(write_checkpoint(tmp_path, state))


def test_unexpected_keys_listed(tmp_path):
    state = golden_state()
    for i in range(7):
        state[f"model.extra.{i}.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"7 unexpected keys \(model\.extra\.0\.weight;.*, \.\.\.\)"):
        load_model(write_checkpoint(tmp_path, state))


def test_unknown_model_type_is_named(tmp_path):
    folder = write_checkpoint(tmp_path, golden_state(), config_edit={"model_type": "gpt2"})
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        load_model(folder)


def test_no_config_or_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    shutil.copy(GOLDEN / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path)


def test_missing_shard_file(tmp_path):
    folder = write_checkpoint(tmp_path, golden_state(), "safetensors-sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files .* missing"):
        load_model(folder)


class _RunsCode:
    """Unpickling this runs a shell command: the classic malicious pytorch_model.bin."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    state = golden_state()
    state["model.norm.weight"] = _RunsCode(marker)
    folder = write_checkpoint(tmp_path / "ckpt", state, "bin")
    with pytest.raises(CheckpointError, match=r"not a weights file \(refusing to unpickle code\)"):
        load_model(folder)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_pickle_of_non_tensors_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path, golden_state(), "bin")
    torch.save({"model.norm.weight": [1, 2, 3]}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a weights file"):
        read_state_dict(folder)


def test_corrupt_safetensors(tmp_path):
    folder = write_checkpoint(tmp_path, golden_state())
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(folder)


# ------------------------------------------------------------------------------------------- adapters

def test_apply_weight_delta_replaces_tensors(tmp_path):
    model = make_tiny()
    name = "model.layers.1.self_attn.k_proj.weight"
    new = torch.randn_like(model.state_dict()[name])
    save_file({name: new, "model.embed_tokens.weight": torch.zeros(99, 32)}, tmp_path / "a.safetensors")
    assert apply_weight_delta(model, tmp_path / "a.safetensors") == ["model.embed_tokens.weight", name]
    assert torch.equal(model.state_dict()[name], new)
    assert not model.lm_head.weight.any()  # tied to the embedding: changed with it


@pytest.mark.parametrize("delta, message", [
    ({"model.layers.9.self_attn.k_proj.weight": torch.zeros(16, 32)}, "unknown tensors"),
    ({"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 32)}, r"expected \(16, 32\), got \(32, 32\)"),
])
def test_apply_weight_delta_rejects_misfits_and_changes_nothing(tmp_path, delta, message):
    model = make_tiny()
    ok = {"model.layers.1.self_attn.q_proj.weight": torch.zeros(32, 32)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({**ok, **delta}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=message):
        apply_weight_delta(model, tmp_path / "a.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_weight_delta_adds_low_rank_pairs_after_replacements(tmp_path):
    model = make_tiny()
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    before = {n: model.state_dict()[n].clone() for n in (q, k)}
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    start = torch.randn_like(before[k])
    save_file({q + ".lora_down": down, q + ".lora_up": up, k: start, k + ".lora_down": torch.randn(2, 32),
               k + ".lora_up": torch.zeros(16, 2)}, tmp_path / "a.safetensors")
    assert apply_weight_delta(model, tmp_path / "a.safetensors") == [k, q]
    torch.testing.assert_close(model.state_dict()[q], before[q] + up @ down)
    assert torch.equal(model.state_dict()[k], start)  # replaced, then a zero increment


@pytest.mark.parametrize("delta, message", [
    ({"model.layers.1.self_attn.k_proj.weight.lora_down": torch.zeros(2, 32)}, "without .lora_up"),
    ({"model.layers.1.self_attn.k_proj.weight.lora_down": torch.zeros(2, 32),
      "model.layers.1.self_attn.k_proj.weight.lora_up": torch.zeros(32, 2)}, r"expected up @ down of \(16, 32\)"),
    ({"model.layers.9.self_attn.k_proj.weight.lora_down": torch.zeros(2, 32),
      "model.layers.9.self_attn.k_proj.weight.lora_up": torch.zeros(16, 2)}, "unknown tensors"),
])
def test_apply_weight_delta_rejects_bad_low_rank_pairs_and_changes_nothing(tmp_path, delta, message):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({"model.layers.1.self_attn.q_proj.weight": torch.zeros(32, 32), **delta}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=message):
        apply_weight_delta(model, tmp_path / "a.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stacked_deltas_equal_applying_them_in_turn(tmp_path):
    """What a delta checkpoint holds (the base's adapter, then the delta): a replacement drops the
    first delta's increment of that weight; two increments of one weight sum (ranks concatenated)."""
    from longllama_lsp.model.loading import stack_weight_deltas

    q, k, v = (f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv")
    first = {q + ".lora_down": torch.randn(2, 32), q + ".lora_up": torch.randn(32, 2),
             k + ".lora_down": torch.randn(2, 32), k + ".lora_up": torch.randn(16, 2), v: torch.randn(16, 32)}
    second = {q + ".lora_down": torch.randn(3, 32), q + ".lora_up": torch.randn(32, 3), k: torch.randn(16, 32)}
    in_turn, stacked = make_tiny(), make_tiny()
    for i, delta in enumerate((first, second)):
        save_file(delta, tmp_path / f"{i}.safetensors")
        apply_weight_delta(in_turn, tmp_path / f"{i}.safetensors")
    save_file(stack_weight_deltas(first, second), tmp_path / "s.safetensors")
    apply_weight_delta(stacked, tmp_path / "s.safetensors")
    for name, want in in_turn.state_dict().items():
        torch.testing.assert_close(stacked.state_dict()[name], want)


def test_load_model_applies_adapter_in_folder(tmp_path):
    folder = write_checkpoint(tmp_path, golden_state())
    name = "model.layers.3.self_attn.v_proj.weight"
    save_file({name: torch.ones(64, 64)}, folder / "adapter.safetensors")
    assert torch.equal(load_model(folder).state_dict()[name], torch.ones(64, 64))
    assert torch.equal(load_model(folder, adapter=False).state_dict()[name], golden_state()[name])


# ------------------------------------------------------------------------------------------ fingerprint

def test_fingerprint_is_content_based_and_cached(tmp_path, monkeypatch):
    a = write_checkpoint(tmp_path / "a", golden_state())
    b = shutil.copytree(a, tmp_path / "b")
    details = fingerprint_details(a)
    assert details["fingerprint"] == model_fingerprint(b)  # same content elsewhere
    assert details["mem_layers"] == [1, 3] and details["mem_dtype"] == "float32" and details["adapter"] is None
    assert set(details["weights"]) == {"model.safetensors"} and details["tokenizer"] == {}
    calls = []
    real = loading.file_sha256
    monkeypatch.setattr(loading, "file_sha256", lambda f, *a: calls.append(f) or real(f, *a))
    assert model_fingerprint(a) == details["fingerprint"] and calls == []  # sidecar hit
    os.utime(a / "model.safetensors", ns=(1, 1))  # touched, same bytes: rehashed, same fingerprint
    assert model_fingerprint(a) == details["fingerprint"] and len(calls) == 1


def test_fingerprint_tracks_what_matters(tmp_path):
    folder = write_checkpoint(tmp_path, golden_state())
    seen = {model_fingerprint(folder)}

    def edit_config(**changes):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return model_fingerprint(folder)

    assert edit_config(transformers_version="9.9.9", use_cache=False) in seen  # tooling only
    for changed in (lambda: edit_config(mem_layers=[3]),
                    lambda: edit_config(mem_dtype="bfloat16"),
                    lambda: save_file({**golden_state(), "model.norm.weight": torch.zeros(64)},
                                      folder / "model.safetensors"),
                    lambda: (folder / "tokenizer.json").write_text("{}"),
                    lambda: save_file({"model.norm.weight": torch.zeros(64)}, folder / "adapter.safetensors")):
        changed()
        fingerprint = model_fingerprint(folder)
        assert fingerprint not in seen
        seen.add(fingerprint)


def test_fingerprint_of_read_only_folder(tmp_path):
    folder = write_checkpoint(tmp_path, golden_state())
    folder.chmod(0o555)
    try:
        assert model_fingerprint(folder) == model_fingerprint(folder)
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------------- tokenizers

def sentencepiece_checkpoint(folder: Path, version: str) -> Path:
    model = TOKENIZERS / f"openllama_{version}.model"
    if not model.is_file():
        pytest.skip(f"{model} not present")
    folder.mkdir(parents=True)
    shutil.copy(model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    return folder


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_openllama_sentencepiece_tokenizers_load(tmp_path, version):
    folder = sentencepiece_checkpoint(tmp_path / version, version)
    if not (loading.module_available("sentencepiece") and loading.module_available("google.protobuf")):
        pytest.skip("needs sentencepiece and protobuf to read tokenizer.model")
    tok = load_tokenizer(folder)
    assert len(tok) == 32000 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    text = 'def f(n):\n\tif  n:\n        return "é ü 漢"  \n'
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == text


def test_sentencepiece_only_tokenizer_says_what_to_install(tmp_path, monkeypatch):
    folder = sentencepiece_checkpoint(tmp_path / "v2", "v2")
    monkeypatch.setattr(loading, "module_available", lambda name: name not in ("sentencepiece", "google.protobuf"))
    with pytest.raises(ModelError, match="pip install sentencepiece protobuf"):
        load_tokenizer(folder)


def test_no_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_memory_training_tells_fot_trained_checkpoints_from_untrained(tmp_path):
    """Which checkpoints may have memory on without a warning (untrained memory hurts: issue 6)."""
    import json as _json

    from longllama_lsp.model.loading import memory_training

    def ckpt(name: str, model_type: str = "longllama", files: dict[str, str] | None = None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(_json.dumps({"model_type": model_type}))
        for f, text in (files or {}).items():
            (d / f).write_text(text)
        return d

    def converted_from(kind: str) -> dict[str, str]:
        return {PROVENANCE_NAME: _json.dumps({"source_kind": kind})}

    gguf = ckpt("gguf", files=converted_from("gguf"))
    assert memory_training(gguf) is None
    (gguf / "adapter.safetensors").write_bytes(b"")
    assert "delta" in memory_training(gguf)
    assert memory_training(ckpt("llama", "llama")) is None
    assert memory_training(ckpt("published")) == "LongLLaMA checkpoint"
    assert "training.json" in memory_training(ckpt("trained", files={"training.json": "{}"}))
    assert memory_training(ckpt("resaved", files=converted_from("longllama"))) == "converted from a LongLLaMA checkpoint"
    for name, record in [("torn", '{"source_kind": "long'), ("list", '["longllama"]')]:  # a damaged record
        assert memory_training(ckpt(name, files={PROVENANCE_NAME: record})) is None
