"""`longllama finetune / train / eval` (finetune/commands.py) and the evaluation (finetune/evaluate.py).

Test Data: a tmp repository of small stdlib modules; a seeded tiny LongLLaMA checkpoint with the
recall task's byte-level tokenizer (fixtures from test_train.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_train import STDLIB, _single_thread, base_dir, tok_dir  # noqa: F401  (fixtures)

from longllama_lsp import cli

REPOS = {"alpha": {"pkg/colorsys.py": "colorsys.py", "pkg/bisect.py": "bisect.py", "pkg/keyword.py": "keyword.py",
                   "tools/tool.py": "json/tool.py", "tools/scanner.py": "json/scanner.py"},
         "beta": {"a/decoder.py": "json/decoder.py", "a/encoder.py": "json/encoder.py", "b/fnmatch.py": "fnmatch.py"}}


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    """Test Data: two small repositories of stdlib modules."""
    out = {}
    for name, files in REPOS.items():
        root = tmp_path_factory.mktemp(name)
        for rel, src in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(STDLIB / src, root / rel)
        out[name] = root
    return out


def test_every_finetune_command_has_help(capsys):
    for name in ("finetune", "train", "eval"):
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: longllama " + name in capsys.readouterr().out


def test_finetune_repo_end_to_end_prints_three_perplexities(repos, base_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ft"
    rc = cli.main(["finetune", "--repo", str(repos["alpha"]), "--model", str(base_dir), "--out", str(out),
                   "--steps", "3", "--seq-len", "32", "--window", "32", "--max-windows", "4", "--lr", "1e-3",
                   "--heldout-fraction", "0.3", "--no-progress", "--keep-always"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "(a) no memory" in text and "(b)/(c) repository memory" in text
    assert ("helps:" in text) or ("does not help:" in text)
    assert f"use it: longllama serve --model {out} " in text  # how to use the output
    report = json.loads((out / "finetune_report.json").read_text())
    for key in ("no_memory_before", "memory_before", "memory_after", "no_memory_after"):
        assert math.isfinite(report[key]) and report[key] > 1
    assert report["steps"] == 3 and report["saved"] == "delta" and report["helps"] == (
        report["memory_after"] <= 0.99 * report["memory_before"] and report["no_memory_after"] <= 1.01 * report["no_memory_before"])
    assert (out / "adapter.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    from finetune.outputs import load_trained

    load_trained(out)  # the delta applies to its base model (fingerprint checked)


def test_finetune_discards_a_result_that_does_not_help(repos, base_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ft0"
    rc = cli.main(["finetune", "--repo", str(repos["alpha"]), "--model", str(base_dir), "--out", str(out),
                   "--steps", "1", "--lr", "1e-9", "--warmup", "0", "--seq-len", "32", "--window", "32",
                   "--max-windows", "2", "--heldout-fraction", "0.3", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "finetune_report.json").read_text())
    if not report["helps"]:
        assert "discarded" in text and not (out / "adapter.safetensors").exists()


def test_finetune_keeps_only_a_gain_beyond_noise_that_forgets_nothing(tmp_path):
    """The keep rule: memory perplexity at least --min-gain percent lower, perplexity without memory at
    most --max-forgetting percent higher (a delta that "helped" by 0.001 perplexity used to be kept)."""
    from finetune.commands import MEMORY, _finetune_summary, _finetune_table
    from finetune.evaluate import EvalReport, FileScore
    from finetune.train import TrainResult

    def report(none: float, repo: float) -> EvalReport:  # perplexities of one held-out file of 100 tokens
        nll = {"none": 100 * math.log(none), MEMORY: 100 * math.log(repo)}
        return EvalReport(512, ["none", MEMORY], [FileScore("r", "a.py", 100, nll, {"none": 0, MEMORY: 900})])

    result = TrainResult(tmp_path, 3, {3: 2.0}, [], "steps", 1000, 1.0)
    before = report(8.0, 7.0)
    cases = {(8.0, 6.999): (False, "not the --min-gain of 1% lower"),  # the old rule kept this one
             (8.0, 6.95): (False, "train longer (--minutes)"),
             (8.0, 6.9): (True, "helps: with memory 6.900 after, 7.000 before (-1.4%)"),
             (8.2, 6.5): (False, "more than the --max-forgetting of 1%"),  # +2.5% without memory
             (8.05, 6.5): (True, "helps:")}
    for (none, repo), (helps, says) in cases.items():
        s = _finetune_summary(before, report(none, repo), result, 1.0, 1.0)
        assert s["helps"] is helps and says in _finetune_table(s, tmp_path, s["helps"])
    assert _finetune_summary(before, report(8.0, 6.999), result, 0.0, 1.0)["helps"]  # --min-gain 0: any gain


def test_eval_cli_table_and_json(repos, base_dir, tmp_path, capsys):  # noqa: F811
    js = tmp_path / "eval.json"
    rc = cli.main(["eval", "--repo", str(repos["alpha"]), "--repo", str(repos["beta"]), "--model", str(base_dir),
                   "--window", "32", "--max-windows", "3", "--heldout-fraction", "0.5", "--json", str(js),
                   "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "TOTAL" in text and "ppl distract" in text
    report = json.loads(js.read_text())
    assert set(report["perplexity"]) == {"none", "own", "repo", "distract"}
    assert all(math.isfinite(v) for v in report["perplexity"].values())
    for f in report["files"]:
        assert f["memory_tokens"]["none"] == 0
        assert f["memory_tokens"]["distract"] > f["memory_tokens"]["repo"] > 0


@pytest.fixture(scope="module")
def tiny(base_dir):  # noqa: F811
    from longllama_lsp.model.loading import load_model, load_tokenizer

    return load_model(base_dir), load_tokenizer(base_dir)


def test_batched_padded_memory_encoding_equals_one_by_one(tiny, repos):
    from finetune.evaluate import EvalArgs, MemoryCache, load_repo

    model, tok = tiny
    repo = load_repo(repos["beta"], tok, EvalArgs(window=32), heldout=[])
    items = {p: t[:150] for p, t in repo.files.items()}
    batched, single = MemoryCache(model, 32, batch_size=8, progress=False), MemoryCache(model, 32, 1, progress=False)
    batched.ensure(items)
    single.ensure(items)
    for p in items:
        a, b = batched.get(p), single.get(p)
        assert a.num_tokens == len(items[p])
        for layer in a:
            torch.testing.assert_close(a[layer].keys, b[layer].keys, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a[layer].values, b[layer].values, rtol=1e-5, atol=1e-6)


def test_retrieved_condition_reads_the_chunks_retrieved_for_the_code_before_each_window(tiny, tmp_path):
    """"retrieved" (what `finetune` judges memory by): window k of a held-out file reads the other files'
    chunks that the server's retrieval picks for the file's code before the window, encoded after the
    tokens before them; the first window has no code before it and reads nothing."""
    from finetune.evaluate import EvalArgs, RetrievedMemory, evaluate, load_repo, score_windows

    model, tok = tiny
    (tmp_path / "pricing.py").write_text("".join(f"def rate_{i}(x):\n    return x * {i}\n\n" for i in range(40))
                                          + "def compute_total(items):\n    return sum(items)\n")
    (tmp_path / "noise.py").write_text("".join(f"def other_{i}(y):\n    return y - {i}\n\n" for i in range(40)))
    (tmp_path / "shop.py").write_text("import pricing\n\n" + "".join(
        f"def order_{i}(items):\n    return pricing.compute_total(items) + {i}\n\n" for i in range(30)))
    args = EvalArgs(window=32, conditions=("none", "retrieved"), batch_size=2, chunk_len=32, retrieve_tokens=96,
                    memory_context=8)
    repo = load_repo(tmp_path, tok, args, heldout=["shop.py"])
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(model, [repo], args, progress=False)
    report = evaluate(model, [repo], args, progress=False, tokenizer=tok)
    (shop,) = report.files
    assert 0 < shop.memory_tokens["retrieved"] <= 96 and shop.nll["retrieved"] != shop.nll["none"]

    reader = RetrievedMemory(model, tok, args)
    assert reader.memory(repo, "shop.py", 0) is None  # nothing typed before the file's first window
    texts = [tok.decode(repo.files[q][i:i + 32]) for _, q, i in reader.keys(repo, "shop.py", 64)]
    assert any("def compute_total" in t for t in texts), texts  # the definition the code before uses
    toks = repo.files["shop.py"]
    windows = [toks[i:i + 32] for i in range(0, len(toks), 32)]
    fresh = RetrievedMemory(model, tok, args)
    want = sum(score_windows(model, [w], lambda _, k=k: fresh.memory(repo, "shop.py", 32 * k))[0]
               for k, w in enumerate(windows) if len(w) >= 2)
    assert shop.nll["retrieved"] == pytest.approx(want, abs=1e-3)  # memory moves a tiny model ~0.1


def test_conditions_follow_their_definitions(tiny, repos):
    """own == none on a one-window file; own == scoring each window with its earlier windows as memory;
    distractors are ratio x the repository's tokens."""
    from finetune.evaluate import EvalArgs, EvalRepo, evaluate, score_windows
    from longllama_lsp.model import Memory

    model, tok = tiny
    ids = list(range(3, 3 + 80))
    repo = EvalRepo("r", Path("."), {"one.py": ids[:30], "long.py": ids, "other.py": ids[::-1]}, ["one.py", "long.py"])
    unrelated = EvalRepo("u", Path("."), {"x.py": list(range(5, 200)) * 3}, [])
    args = EvalArgs(window=32, distractor_ratio=1.5, batch_size=2)
    report = evaluate(model, [repo], args, [unrelated], progress=False)
    one, long = report.files
    assert one.nll["own"] == pytest.approx(one.nll["none"], rel=1e-5)
    windows = [ids[i:i + 32] for i in range(0, len(ids), 32)]
    enc = [model.encode_memory(torch.tensor([w])) for w in windows]
    memories = [Memory.concat(enc[:i]) if i else None for i in range(len(windows))]
    want = sum(score_windows(model, [w], lambda _, m=m: m)[0] for w, m in zip(windows, memories, strict=True))
    assert long.nll["own"] == pytest.approx(want, rel=1e-4)
    assert long.memory_tokens["repo"] == 30 + 80
    assert long.memory_tokens["distract"] == 110 + int(1.5 * (30 + 80 + 80))
    assert report.ppl("none") > 1 and "TOTAL" in report.table()
