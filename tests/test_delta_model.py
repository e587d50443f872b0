"""A `longllama finetune` output (a weight delta) used as `--model`: resolve.delta_checkpoint.

Test Data: a tiny seeded LongLLaMA checkpoint and a tiny repository of stdlib modules (fixtures from
test_train.py / test_finetune_cli.py), fine-tuned for 3 steps by the real `longllama finetune`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_finetune_cli import repos  # noqa: F401  (fixture)
from test_train import _single_thread, base_dir, tok_dir  # noqa: F401  (fixtures)

from longllama_lsp import cli


@pytest.fixture(scope="module")
def delta_dir(repos, base_dir, tmp_path_factory) -> Path:  # noqa: F811
    """Test Data: the weight delta `longllama finetune --keep-always` writes for the tiny base."""
    out = tmp_path_factory.mktemp("ft") / "delta"
    rc = cli.main(["finetune", "--repo", str(repos["alpha"]), "--model", str(base_dir), "--out", str(out),
                   "--steps", "3", "--seq-len", "32", "--window", "32", "--max-windows", "4", "--lr", "1e-2",
                   "--heldout-fraction", "0.3", "--no-progress", "--keep-always"])
    assert rc == 0 and (out / "adapter.json").is_file() and not (out / "config.json").exists()
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LONGLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LONGLLAMA_MODEL", raising=False)
    return tmp_path / "cache"


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("def add(a, b):\n    return a + b\n")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_delta_as_model_loads_the_fine_tuned_model(delta_dir, base_dir, cache):  # noqa: F811
    from finetune.outputs import load_trained
    from longllama_lsp.load import load_model_and_tokenizer
    from longllama_lsp.model.loading import load_model

    model, tokenizer, model_dir = load_model_and_tokenizer(delta_dir, "cpu", "float32")
    assert (model_dir / "config.json").is_file() and model_dir.is_relative_to(cache)
    trained, _ = load_trained(delta_dir)
    fine = _logits(model, tokenizer)
    assert torch.equal(fine, _logits(trained, tokenizer))
    assert not torch.allclose(fine, _logits(load_model(base_dir), tokenizer))


def test_a_delta_checkpoint_is_built_once_and_fingerprinted_apart_from_its_base(delta_dir, base_dir, cache):  # noqa: F811
    from indexer.pipeline import checkpoint_fingerprint
    from longllama_lsp.resolve import resolve_model

    said: list[str] = []
    built = resolve_model(str(delta_dir), progress=said.append)
    assert len(said) == 2 and "Applying the weight delta" in said[0]
    assert resolve_model(None, str(delta_dir), progress=said.append) == built and len(said) == 2  # cached
    assert checkpoint_fingerprint(built).digest != checkpoint_fingerprint(base_dir).digest
    assert json.loads((built / "longllama_delta.json").read_text())["delta"] == str(delta_dir)
    assert resolve_model(str(delta_dir), keep_delta=True) == delta_dir  # what training continues from


def test_a_delta_trained_at_other_memory_layers_than_its_base_is_refused(delta_dir, base_dir, cache, tmp_path):  # noqa: F811
    """Training's config_overrides can move memory; the base's config would silently put it back. Both
    ways in check it: the server's (resolve_model) and evaluation's (load_trained)."""
    import shutil

    from finetune.outputs import load_trained
    from longllama_lsp.errors import ModelError
    from longllama_lsp.resolve import resolve_model

    moved = tmp_path / "moved"
    shutil.copytree(delta_dir, moved)
    meta = json.loads((moved / "adapter.json").read_text())
    base_layers = json.loads((base_dir / "config.json").read_text())["mem_layers"]
    meta["mem_layers"] = [i + 1 for i in base_layers]
    (moved / "adapter.json").write_text(json.dumps(meta))
    for load in (lambda d: resolve_model(str(d), progress=lambda _: None), load_trained):
        with pytest.raises(ModelError, match=r"trained with memory layers .* --mem-layers"):
            load(moved)
    meta["mem_layers"] = 5
    (moved / "adapter.json").write_text(json.dumps(meta))
    for load in (lambda d: resolve_model(str(d), progress=lambda _: None), load_trained):
        with pytest.raises(ModelError, match="mem_layers must be a list of layer numbers"):
            load(moved)
    assert resolve_model(str(delta_dir), progress=lambda _: None).is_dir()  # the layers it names: accepted


def test_an_index_of_the_base_is_not_reused_with_the_fine_tuned_model(delta_dir, base_dir, repos, cache,  # noqa: F811
                                                                      capsys):
    from indexer.pipeline import checkpoint_fingerprint
    from longllama_lsp.resolve import resolve_model

    index = ["index", str(repos["beta"]), "--chunk-tokens", "64", "--quiet"]
    assert cli.main([*index, "--model", str(base_dir)]) == 0
    assert cli.main([*index, "--model", str(delta_dir)]) == 0
    capsys.readouterr()
    assert cli.main(["status", str(repos["beta"]), "--json"]) == 0
    text, decoder, indexes = capsys.readouterr().out, json.JSONDecoder(), {}
    while text.strip():  # one JSON object per index
        doc, end = decoder.raw_decode(text.lstrip())
        indexes[doc["fingerprint"]], text = doc, text.lstrip()[end:]
    fine = checkpoint_fingerprint(resolve_model(str(delta_dir))).digest
    assert indexes.keys() == {checkpoint_fingerprint(base_dir).digest, fine}
    assert indexes[fine]["chunks"] > 0 and indexes[fine]["chunks_missing_memory"] == 0  # encoded anew


def test_complete_serves_a_delta_given_as_model(delta_dir, repos, cache, capsys):  # noqa: F811
    source = repos["beta"] / "a" / "decoder.py"
    rc = cli.main(["complete", f"{source}:1:1", "--repo", str(repos["beta"]), "--model", str(delta_dir),
                   "--max-tokens", "2", "--no-memory", "--no-server", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["generated_tokens"] == 2 and "Applying the weight delta" in err
