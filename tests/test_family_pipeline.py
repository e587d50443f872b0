"""Each model family through convert, load, serve and train (issue 17), not only through the model.

Test Data: tiny random transformers models (test_families.save_family: Mistral, Qwen2 with its q/k/v
bias, StarCoder2 with LayerNorms, a plain GELU MLP and biases everywhere) with the stdlib BPE carrying
each family's hub special tokens (helpers_tokenizer.family_tokenizer: Qwen2 has no BOS and the Qwen
FIM markers, StarCoder2 its FIM markers and BOS = EOS), converted with memory layers; a two-file
repository indexed by the real indexer; test_train's corpus of stdlib modules for FoT training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_tokenizer import FAMILY_SPECIALS, family_tokenizer
from test_families import CASES, save_family
from test_train import _single_thread, config, corpus  # noqa: F401  (fixtures)

from finetune.outputs import load_trained
from finetune.train import train
from longllama_lsp.convert import convert
from longllama_lsp.engine import Engine, EngineOptions
from longllama_lsp.model.loading import load_model
from longllama_lsp.workspace import Workspace

FAMILIES = ["mistral", "qwen2-tied", "starcoder2"]
# Which attention projections carry a bias in each family (what FoT training must train along).
BIASED = {"mistral": "", "qwen2-tied": "qkv", "starcoder2": "qkvo"}
REPO = {"shapes.py": "class Circle:\n    def __init__(self, radius):\n        self.radius = radius\n\n"
                     "    def area(self):\n        return 3.14159 * self.radius ** 2\n",
        "util.py": "def describe(shape):\n    return f'{type(shape).__name__} of area {shape.area():.2f}'\n"}


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory) -> tuple[str, Path]:
    """(case, a converted LongLLaMA folder): memory layers [1, 2, 3] of 4, window 64."""
    case = request.param
    family = CASES[case]["family"]
    tok = family_tokenizer(family)
    d = tmp_path_factory.mktemp(case)
    src = save_family(d / "src", **{**CASES[case], "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                          "eos_token_id": tok.eos_token_id}, tokenizer=tok)
    return case, convert(src, d / "out")


@pytest.fixture
def repo_dir(tmp_path) -> Path:
    for rel, text in REPO.items():
        (tmp_path / rel).write_text(text)
    return tmp_path


def serve_completion(model: Path, root: Path) -> tuple[dict, object]:
    """(engine status, Completion): `model` served by an engine, `root` indexed by the real indexer, a
    mid-line completion in a new file of `root` with the text after the cursor."""
    engine = Engine.load(model, "cpu", options=EngineOptions(max_tokens=6, answer_max_tokens=6))
    engine.wait_ready()  # the indexer opens on the loaded checkpoint
    workspace = Workspace(engine)
    try:
        workspace.index(workspace.open(root, user="test"))
        text = "from shapes import Circle\n\nc = Circle(2)\nprint(c.ar)\n"
        offset = text.index("ar)") + 2
        return engine.status(), engine.complete(text, offset, path=str(root / "main.py"), mode="block")
    finally:
        workspace.close()


def test_converted_family_serves_completions_with_repository_sources(converted, repo_dir):
    case, model = converted
    status, done = serve_completion(model, repo_dir)
    fim = FAMILY_SPECIALS[CASES[case]["family"]][2]
    assert status["memLayers"] == [1, 2, 3] and status["fim"] == fim  # the FIM prompt where the tokenizer has it
    assert done.prompt_tokens > 0 and done.memory_tokens > 0 and done.stop_reason in ("eos", "max_tokens", "stop")
    assert {s.path for s in done.sources} & set(REPO), done.sources  # (main.py: the rest of the buffer)


def memory_attention_tensors(case: str) -> set[str]:
    """What FoT trains in the converted tiny model: q/k/v/o of memory layers 1-3 with their biases."""
    return {f"model.layers.{layer}.self_attn.{p}_proj.{kind}" for layer in (1, 2, 3) for p in "qkvo"
            for kind in ("weight", "bias") if kind == "weight" or p in BIASED[case]}


def test_converted_family_trains_memory_layers_and_the_delta_loads_back(converted, corpus, tmp_path):  # noqa: F811
    """A few FoT crossbatch steps (train = memory, a weight delta) on the converted model."""
    from safetensors.torch import load_file

    case, model = converted
    out = tmp_path / "delta"
    cfg = config(corpus, out, steps=3, lr=1e-2, model_path=str(model), model_train="memory", output="delta")
    result = train(cfg)
    assert result.step == 3 and all(math.isfinite(loss) for loss in result.losses.values()), result.losses
    delta = load_file(out / "adapter.safetensors")
    assert set(delta) == memory_attention_tensors(case)
    base = load_model(model, adapter=False).state_dict()
    unchanged = [n for n, t in delta.items() if torch.equal(t, base[n])]
    assert not unchanged, f"training left these memory-layer tensors as they were: {unchanged}"
    assert json.loads((out / "adapter.json").read_text())["mem_layers"] == [1, 2, 3]

    tuned, _ = load_trained(out)  # the delta on its base (fingerprint checked)
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, result.model.eval()(ids).logits)
