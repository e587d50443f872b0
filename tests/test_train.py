"""FoT training loop (finetune/train.py) and the recall fixture (finetune/recall_task.py).

Test Data: a random PRESETS["tiny"] LongLLaMA with the recall fixture's byte-level BPE (built
in-test, ~3 s), trained on a few stdlib modules copied into tmp dirs; tests/fixtures/recall-tiny.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from finetune.config import RunConfig
from finetune.outputs import load_trained
from finetune.train import train

FIXTURES = Path(__file__).parent / "fixtures"
RECALL = FIXTURES / "recall-tiny"
STDLIB = Path(json.__file__).parent.parent
REPO_FILES = {"pkg/a": ["json/decoder.py", "json/scanner.py", "json/tool.py"],
              "pkg/b": ["colorsys.py", "bisect.py", "keyword.py"]}


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Every test here runs on tiny tensors (conftest's one_thread)."""
    yield


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """Test Data: the recall task's byte-level BPE (vocab ~1k), saved as a tokenizer dir."""
    from finetune.recall_task import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Test Data: six small stdlib modules in two directories (two directory documents)."""
    root = tmp_path_factory.mktemp("corpus")
    for sub, names in REPO_FILES.items():
        (root / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(STDLIB / n, root / sub / Path(n).name)
    return root


@pytest.fixture(scope="session")
def base_dir(tok_dir, tmp_path_factory) -> Path:
    """Test Data: a seeded tiny LongLLaMA checkpoint (safetensors + config + tokenizer) on disk."""
    from finetune.config import ModelArgs
    from finetune.outputs import save_output
    from finetune.train import load_for_training

    model, tok, _ = load_for_training(ModelArgs(preset="tiny", tokenizer=str(tok_dir), train="all"))
    d = tmp_path_factory.mktemp("base")
    save_output(model, tok, RunConfig(), d, None, "full")
    return d


def config(corpus: Path, out: Path, **train) -> RunConfig:
    base = {"steps": 6, "lr": 3e-3, "weight_decay": 0.0, "progress": False, "output": "none", "eval_batches": 0,
            "heldout_fraction": 0.0, "out_dir": str(out)}
    model = {k.removeprefix("model_"): train.pop(k) for k in list(train) if k.startswith("model_")}
    return RunConfig.from_dict({
        "model": {**({} if "path" in model else {"preset": "tiny"}), "train": "all", **model},
        "data": {"sources": [str(corpus)], "seq_len": 32, "batch_size": 8, "pack": 4, "cross_batch_range": 3,
                 "min_doc_tokens": 64},
        "train": {**base, **train}})


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_cpu_run_lowers_loss_and_writes_run_dir(corpus, tok_dir, tmp_path):
    cfg = config(corpus, tmp_path / "run", steps=10, model_tokenizer=str(tok_dir), eval_every=5, eval_batches=1,
                 heldout_fraction=0.3, output="full")
    result = train(cfg)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert result.step == 10 and result.stopped == "steps"
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    assert all(r["tokens_per_s"] > 0 and r["range"] == 3 and r["lr"] == 3e-3 for r in rows if "loss" in r)
    evals = [r for r in rows if "eval_loss" in r]
    assert [e["step"] for e in evals] == [5, 10] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0] or saved["versions"]["torch"]
    assert saved["data"]["seq_len"] == 32 and saved["train"]["steps"] == 10
    model, _ = load_trained(tmp_path / "run")  # a full checkpoint, loadable by path
    ids = torch.randint(0, 50, (1, 12))
    assert torch.allclose(model(ids).logits, result.model.eval()(ids).logits, atol=1e-5)


def test_time_budget_stops_before_the_step_limit(corpus, tok_dir, tmp_path):
    result = train(config(corpus, tmp_path / "t", steps=50, max_minutes=0.0, model_tokenizer=str(tok_dir)))
    assert result.stopped == "time" and result.step == 0


@pytest.mark.parametrize("mode", ["lora"])
def test_resume_continues_the_same_curve(corpus, tok_dir, tmp_path, mode):
    """6 steps straight vs 3 steps + resume for 3: identical losses (LoRA dropout exercises the RNG)."""
    kw = dict(model_tokenizer=str(tok_dir), model_train=mode, model_lora_dropout=0.1, model_lora_r=4,
              warmup_steps=4, save_every=3)
    straight = train(config(corpus, tmp_path / "a", **kw))
    train(config(corpus, tmp_path / "b", **{**kw, "steps": 3}))
    resumed = train(config(corpus, tmp_path / "b", **{**kw, "resume": "latest"}))
    assert sorted(resumed.losses) == [4, 5, 6]
    for s in (4, 5, 6):
        assert resumed.losses[s] == pytest.approx(straight.losses[s], rel=1e-6, abs=1e-7)
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(corpus, tok_dir, tmp_path):
    """2 processes (`accelerate launch --multi_gpu`: DDP, over gloo on this CPU-only machine) vs one
    process, same config and global batch: same loss curve and weights within fp tolerance."""
    toml = tmp_path / "cfg.toml"
    toml.write_text(f"""
[model]
preset = "tiny"
tokenizer = "{tok_dir}"
train = "all"
[data]
sources = ["{corpus}"]
seq_len = 32
batch_size = 8
pack = 4
min_doc_tokens = 64
[train]
steps = 4
lr = 3e-3
warmup_steps = 2
micro_batch_size = 4
progress = false
heldout_fraction = 0.0
output = "full"
cpu = true
""")
    one = _launch([sys.executable, "-m", "longllama_lsp.cli", "train", str(toml), "--out", str(tmp_path / "one")],
                  tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), "-m", "longllama_lsp.cli", "train", str(toml),
                   "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["processes"] == 2
    a = [r["loss"] for r in metrics(tmp_path / "one")]
    b = [r["loss"] for r in metrics(tmp_path / "two")]
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert a == pytest.approx(b, rel=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def _grads(model, run) -> dict[str, torch.Tensor]:
    model.zero_grad()
    run(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["crossbatch", "long_input"])
def test_gradient_checkpointing_keeps_memory_kv_differentiable(path, monkeypatch):
    """Same grads with and without checkpointing, memory layer v_proj included; the reference's
    reentrant checkpointing (simulated) detaches memory K/V, which this test would catch."""
    from longllama_lsp.model import PRESETS, LongLlamaConfig, LongLlamaForCausalLM
    from longllama_lsp.model import modeling_longllama as mm
    from longllama_lsp.model.crossbatch import CrossBatch

    torch.manual_seed(0)
    cfg = LongLlamaConfig(**{**PRESETS["tiny"], "num_hidden_layers": 3, "mem_layers": [1],
                             "max_position_embeddings": 16, "last_context_length": 16})
    model = LongLlamaForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 16) if path == "crossbatch" else (2, 48))
    if path == "crossbatch":
        def run(m):
            return m(ids, labels=ids, crossbatch=CrossBatch(range=3, pack=2)).loss
    else:  # 48 tokens = 2 windows into memory + the last 16 with memory, as in long-context fine-tuning
        def run(m):
            return m(ids, labels=ids, use_cache=False, last_context_length=16).loss
    plain = _grads(model, run)
    model.model.gradient_checkpointing = True
    ckpt = _grads(model, run)
    v = "model.layers.1.self_attn.v_proj.weight"
    assert plain[v].abs().sum() > 0
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
    if path == "long_input":
        real = mm.checkpoint
        monkeypatch.setattr(mm, "checkpoint", lambda fn, *a, use_reentrant: real(fn, *a, use_reentrant=True))
        reentrant = _grads(model, run)
        assert not torch.allclose(reentrant[v], plain[v], rtol=1e-3, atol=1e-6), "reentrant should detach memory"


def test_lora_delta_loads_and_changes_outputs(corpus, base_dir, tmp_path):
    from longllama_lsp.model.loading import load_model, model_fingerprint

    cfg = config(corpus, tmp_path / "lora", steps=3, lr=2e-2, model_path=str(base_dir), model_train="lora",
                 model_lora_r=4, output="delta")
    result = train(cfg)
    meta = json.loads((tmp_path / "lora" / "adapter.json").read_text())
    assert meta["base_fingerprint"] == model_fingerprint(base_dir)
    # low-rank pairs (r = 4), not merged (out, in) matrices: a LoRA delta stays the adapters' size
    assert set(meta["tensors"]) == {f"model.layers.1.self_attn.{p}_proj.weight.lora_{d}" for p in "qkvo"
                                    for d in ("down", "up")}
    assert meta["tensors"]["model.layers.1.self_attn.q_proj.weight.lora_down"][0] == 4
    assert not (tmp_path / "lora" / "config.json").exists()  # a delta, not a checkpoint
    base = load_model(base_dir)
    tuned, _ = load_trained(tmp_path / "lora")
    also = load_model(base_dir, adapter=tmp_path / "lora" / "adapter.safetensors")
    ids = torch.randint(0, 200, (2, 20))
    with torch.no_grad():
        want = result.model.eval()(ids).logits  # the PEFT model, LoRA unmerged
        got, b = tuned(ids).logits, base(ids).logits
    assert (got - b).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(also(ids).logits, got)


def test_memory_mode_trains_only_memory_attention(corpus, base_dir, tmp_path):
    cfg = config(corpus, tmp_path / "mem", steps=2, model_path=str(base_dir), model_train="memory", output="delta")
    result = train(cfg)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained == {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"}
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "mem" / "adapter.safetensors")) == trained


def test_training_continues_from_a_delta_on_its_base(corpus, base_dir, tmp_path):
    """Stage 2 of a recipe: --model a delta dir starts from the delta; the new delta is again of the base."""
    from safetensors.torch import load_file

    from longllama_lsp.model.loading import load_model, model_fingerprint

    train(config(corpus, tmp_path / "s1", steps=2, model_path=str(base_dir), model_train="memory", output="delta"))
    stage1 = load_file(tmp_path / "s1" / "adapter.safetensors")
    cfg = config(corpus, tmp_path / "s2", steps=1, lr=0.0, model_path=str(tmp_path / "s1"), model_train="memory",
                 output="delta", max_grad_norm=None)
    train(cfg)  # lr 0: the weights it starts from are what it saves
    meta = json.loads((tmp_path / "s2" / "adapter.json").read_text())
    assert Path(meta["base_model"]) == base_dir.resolve() and meta["base_fingerprint"] == model_fingerprint(base_dir)
    stage2 = load_file(tmp_path / "s2" / "adapter.safetensors")
    assert stage2.keys() == stage1.keys() and all(torch.equal(stage2[k], stage1[k]) for k in stage1)
    assert not torch.equal(stage1["model.layers.1.self_attn.q_proj.weight"],
                           load_model(base_dir).state_dict()["model.layers.1.self_attn.q_proj.weight"])


def test_config_toml_overrides_and_errors(tmp_path):
    cfg = RunConfig.load(Path(__file__).parents[1] / "finetune" / "configs" / "tiny.toml",
                         ["train.lr=0.5", "data.sources=['x']", "model.train=memory", "train.out_dir=/tmp/r"])
    assert cfg.train.lr == 0.5 and cfg.data.sources == ["x"] and cfg.model.train == "memory"
    assert cfg.train.out_dir == "/tmp/r" and cfg.data.d_schedule == [(0, 1), (10, 3)]
    # the run dir's copy of the recipe says what the command line changed (it used to read as the recipe)
    assert cfg.source_toml.startswith("# overridden on the command line: -o 'train.lr=0.5'\n")
    assert tomllib.loads(cfg.source_toml)["train"]["lr"] != 0.5 and "model.train=memory" in cfg.source_toml
    for bad in (["train.nope=1"], ["model.train=everything"], ["train.output=zip"]):
        with pytest.raises(ValueError):
            RunConfig.load(None, bad)
    for toml in (Path(__file__).parents[1] / "finetune" / "configs").glob("*.toml"):
        from finetune.retrieval_train import RetrievalConfig, is_retrieval_recipe

        # every shipped config parses, each with the loader `longllama train` picks for it
        (RetrievalConfig if is_retrieval_recipe(toml) else RunConfig).load(toml)


# ---------------------------------------------------------------------------------------------
# Recall: a tiny model trained on the dictionary-lookup task retrieves from memory


@pytest.fixture(scope="module")
def recall_model():
    """Test Data: tests/fixtures/recall-tiny (made by finetune/recall_task.py)."""
    from longllama_lsp.model.loading import load_model, load_tokenizer

    return load_model(RECALL), load_tokenizer(RECALL)


def test_recall_fixture_is_small_and_documented():
    size = sum(f.stat().st_size for f in RECALL.iterdir())
    assert size < 2_000_000
    readme = (RECALL / "README.md").read_text()
    assert "## Prompt format" in readme and "KEY = VALUE" in readme


def test_recall_accuracy_with_memory_far_above_without(recall_model):
    from finetune.recall_task import evaluate_recall

    model, tok = recall_model
    acc = evaluate_recall(model, tok, trials=16, seed=7)
    assert acc["with_memory"] >= 0.8, acc
    assert acc["without_memory"] <= 0.1, acc


def test_recall_completion_from_another_file(recall_model):
    """Text in, text out: the answer exists only in the memory chunk ("another file")."""
    from finetune.recall_task import KEYS, VALUES

    model, tok = recall_model
    pairs = [(KEYS[i], VALUES[(7 * i) % len(VALUES)]) for i in range(40, 52)]
    other_file = "".join(f"{k} = {v}\n" for k, v in pairs)
    memory = model.encode_memory(torch.tensor([tok.encode(other_file, add_special_tokens=False)]))
    hits = {"memory": 0, "none": 0}
    for k, v in pairs:
        prompt = torch.tensor([tok.encode(f"x = 1\n{k} =", add_special_tokens=False)])
        for name, mem in (("memory", memory), ("none", None)):
            out = model.generate(prompt, max_new_tokens=2, memory=mem)
            text = tok.decode(out[0, prompt.shape[1]:])
            hits[name] += text.startswith(f" {v}")
    assert hits["memory"] >= len(pairs) - 2 and hits["none"] <= 2, hits


@pytest.mark.slow
def test_recall_training_from_scratch(tmp_path):
    from finetune.recall_task import evaluate_recall, train_recall

    model, tok, _, result = train_recall(tmp_path, progress=False)
    acc = evaluate_recall(model, tok, trials=16)
    assert acc["with_memory"] >= 0.8 and acc["without_memory"] <= 0.1, acc
