"""FoT data pipeline (finetune/data.py, finetune/config.py).

Test Data: tiny corpora written into tmp_path; a character tokenizer (the tokenizer is not under
test) and one byte-level BPE trained in-test on a few stdlib modules.
"""

import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import indexer
from finetune.config import DataArgs
from finetune.data import (
    IGNORE_INDEX,
    collect_files,
    document_text,
    fot_batches,
    group_documents,
    k_packing_batches,
    split_repo_files,
)

BOS, EOS = 1, 2
SECRET = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7b3xq\n-----END RSA PRIVATE KEY-----\n"


class CharTokenizer:
    bos_token_id, eos_token_id = BOS, EOS

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


@pytest.fixture(autouse=True)
def walker(monkeypatch):
    """The real indexer.walker when it exists, else a stand-in with its interface (walk, looks_like_secret)."""
    try:
        from indexer import walker as real
        return real
    except ImportError:
        pass

    def walk(root):
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for f in sorted(files):
                yield types.SimpleNamespace(path=os.path.relpath(os.path.join(d, f), root))

    fake = types.ModuleType("indexer.walker")
    fake.walk = walk
    fake.looks_like_secret = lambda text: "PRIVATE KEY-----" in text
    monkeypatch.setitem(sys.modules, "indexer.walker", fake)
    monkeypatch.setattr(indexer, "walker", fake, raising=False)
    return fake


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def args_for(root, **kw):
    base = dict(sources=[str(root)], min_doc_tokens=0, seq_len=8, batch_size=4, pack=2, seed=0)
    return DataArgs(**{**base, **kw})


def test_exact_k_packing_layout():
    docs = [[1, 10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 31, 32, 33, 34, 35, 2], [1, 40, 2],
            [1, 50, 51, 52, 2], [1, 60, 61, 62, 63, 64, 2]]
    source = iter([(d, [0.0] + [1.0] * (len(d) - 1), f"d{i}") for i, d in enumerate(docs)])
    batches = k_packing_batches(source, batch_size=4, seq_len=3, pack=2)
    b0, b1 = next(batches), next(batches)
    # stream 0 = d0 d1 d3 d4 ..., stream 1 = d2 d5 ...; rows (0,1) and (2,3) are its consecutive chunks
    assert b0["input_ids"].tolist() == [[1, 10, 11], [12, 2, 1], [1, 30, 31], [32, 33, 34]]
    assert b0["target_ids"].tolist() == [[10, 11, 12], [2, 1, 20], [30, 31, 32], [33, 34, 35]]
    assert b0["loss_mask"].tolist() == [[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]]
    assert b0["labels"].tolist() == [[IGNORE_INDEX, 10, 11], [12, 2, IGNORE_INDEX], [IGNORE_INDEX, 30, 31],
                                     [32, 33, 34]]
    assert b0["doc_ids"].tolist() == [[0, 0, 0], [0, 0, 1], [2, 2, 2], [2, 2, 2]]
    assert b0["doc_names"] == {0: "d0", 1: "d1", 2: "d2"}
    assert b1["input_ids"].tolist() == [[20, 21, 2], [1, 40, 2], [35, 2, 1], [60, 61, 62]]
    assert b1["doc_ids"].tolist() == [[1, 1, 1], [3, 3, 3], [2, 2, 5], [5, 5, 5]]
    assert b1["doc_names"] == {1: "d1", 2: "d2", 3: "d3", 5: "d5"}
    assert b1["input_ids"].dtype == b1["labels"].dtype == torch.long


def test_packs_are_consecutive_chunks_of_one_document_stream(tmp_path):
    files = {f"pkg{i}/m{j}.py": f"# {i}.{j}\n" + "x = 1\n" * (3 + 5 * i + j) for i in range(6) for j in range(2)}
    args = args_for(write(tmp_path / "repo", files), seq_len=16, batch_size=6, pack=3)
    batches = fot_batches(args, CharTokenizer())
    streams = [[] for _ in range(2)]
    stream_ids = [[] for _ in range(2)]
    names = {}
    for _ in range(8):
        b = next(batches)
        names.update(b["doc_names"])
        for j in range(2):
            streams[j] += b["input_ids"][3 * j:3 * j + 3].reshape(-1).tolist()
            stream_ids[j] += b["doc_ids"][3 * j:3 * j + 3].reshape(-1).tolist()
    for tokens, ids in zip(streams, stream_ids, strict=True):
        assert ids == sorted(ids)  # a stream finishes a document before taking the next
        starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
        for s, e in zip(starts, starts[1:], strict=False):
            doc = tokens[s:e]
            assert doc[0] == BOS and doc[-1] == EOS and BOS not in doc[1:] and EOS not in doc[:-1]
            text = "".join(map(chr, doc[1:-1]))
            directory = names[ids[s]].split("/", 1)[1]
            assert sorted(text.splitlines(keepends=True)) == sorted(
                "".join(v for k, v in files.items() if k.startswith(directory + "/")).splitlines(keepends=True))


def test_same_seed_same_batches_other_seed_differs(tmp_path):
    root = write(tmp_path / "repo", {f"d{i % 3}/f{i}.py": f"v{i} = {i}\n" * (i + 2) for i in range(12)})

    def first(seed, n=4):
        it = fot_batches(args_for(root, seed=seed), CharTokenizer())
        return [next(it)["input_ids"] for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_same_directory_grouping_and_seeded_file_order(tmp_path):
    import random

    root = write(tmp_path / "repo", {"a/x.py": "x\n", "a/y.py": "y", "b/z.py": "z\n", "b/sub/w.py": "w\n",
                                     "top.py": "t\n", **{f"c/f{i}.py": f"{i}\n" for i in range(6)}})
    docs = group_documents(collect_files(args_for(root)))
    assert [(d.name, [f.path for f in d.files]) for d in docs] == [
        ("repo/.", ["top.py"]), ("repo/a", ["a/x.py", "a/y.py"]), ("repo/b", ["b/z.py"]),
        ("repo/b/sub", ["b/sub/w.py"]), ("repo/c", [f"c/f{i}.py" for i in range(6)])]
    assert document_text(docs[1], random.Random(0)) in ("x\ny\n", "y\nx\n")  # newline added after "y"
    assert document_text(docs[1], random.Random(0), "# {path}\n").count("# a/") == 2
    orders = {document_text(docs[4], random.Random(s)) for s in range(5)}
    assert len(orders) > 1 and orders == {document_text(docs[4], random.Random(s)) for s in range(5)}


def test_dedup_size_language_and_secret_filters(tmp_path):
    root = write(tmp_path / "repo", {"a/one.py": "same = 1\n", "b/two.py": "same = 1\n", "a/big.py": "# comment\n" * 600,  # many short lines: not "minified"
                                     "a/notes.txt": "text\n", "a/key.py": "KEY = '''\n" + SECRET + "'''\n",
                                     "a/ok.py": "ok = 2\n"})
    (root / "a/blob.py").write_bytes(b"\x00\x01binary")
    kept = lambda **kw: [f.path for f in collect_files(args_for(root, **kw))]  # noqa: E731
    assert kept(max_file_bytes=1000, languages=["py"]) == ["a/ok.py", "a/one.py"]
    assert kept(max_file_bytes=1000, languages=["py"], dedup=False) == ["a/ok.py", "a/one.py", "b/two.py"]
    assert "a/notes.txt" in kept() and "a/big.py" in kept() and "a/key.py" not in kept()


def test_min_doc_tokens_drops_short_documents(tmp_path):
    root = write(tmp_path / "repo", {"short/a.py": "s\n", "long/b.py": "long = 1\n" * 20, "mid/c.py": "m = 1\n" * 6})
    it = fot_batches(args_for(root, min_doc_tokens=30), CharTokenizer())
    seen = set()
    for _ in range(20):
        seen |= set(next(it)["doc_names"].values())
    assert seen == {"repo/long", "repo/mid"}  # len([bos] + 2 chars + [eos]) = 4 < 30
    with pytest.raises(ValueError, match="min_doc_tokens"):
        next(fot_batches(args_for(root, min_doc_tokens=10_000), CharTokenizer()))


def test_real_byte_level_bpe_round_trips_documents(tmp_path):
    import glob as glob_mod
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sources = [inspect.getsourcefile(m) for m in (textwrap, glob_mod, inspect)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(sources[:2], trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    class HFLike:
        bos_token_id, eos_token_id = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        encode = staticmethod(tok.encode)  # returns an Encoding; data.py reads .ids

    texts = {f"m{i}/{Path(p).name}": Path(p).read_text()[:3000].rstrip("\n") for i, p in enumerate(sources)}
    it = fot_batches(args_for(write(tmp_path / "repo", texts), seq_len=256, batch_size=2, pack=2,
                              min_doc_tokens=100), HFLike())
    batches = [next(it) for _ in range(6)]  # one stream (rows 0, 1), continued batch after batch
    stream = torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()
    ids = torch.cat([b["doc_ids"].reshape(-1) for b in batches]).tolist()
    end = stream.index(HFLike.eos_token_id)
    assert stream[0] == HFLike.bos_token_id and set(ids[:end + 1]) == {0} and ids[end + 1] == 1
    name = batches[0]["doc_names"][0]
    file = next(k for k in texts if k.startswith(name.split("/", 1)[1] + "/"))
    assert tok.decode(stream[1:end], skip_special_tokens=False) == texts[file] + "\n"  # cut mid-line


def test_split_repo_files_deterministic_disjoint_and_stable(tmp_path):
    root = write(tmp_path / "repo", {f"p{i // 10}/f{i}.py": f"{i}\n" for i in range(200)})
    train, held = split_repo_files(root, 0.1, seed=3)
    assert (train, held) == split_repo_files(root, 0.1, seed=3)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 200
    assert 8 <= len(held) <= 35 and held != split_repo_files(root, 0.1, seed=4)[1]
    write(root, {"new/extra.py": "e\n"})
    assert set(held) <= set(split_repo_files(root, 0.1, seed=3)[1])  # adding files moves nobody
    small = write(tmp_path / "small", {"a.py": "a\n", "b.py": "b\n"})
    assert len(split_repo_files(small, 0.1, seed=0)[1]) == 1
    files = [f.path for f in collect_files(args_for(root), only=set(train))]
    assert files == sorted(train) and not set(files) & set(held)


def test_split_repo_files_holds_out_code_only(tmp_path):
    """A held-out LICENSE or changelog judged `longllama finetune` on prose (found by hand: click's one
    held-out file was its LICENSE.rst); prose is held out only where a repository has under 2 code files."""
    docs = {f"docs/page{i}.md": f"# page {i}\n" for i in range(60)}
    root = write(tmp_path / "repo", {**docs, "LICENSE.rst": "BSD\n", "a.py": "a = 1\n", "b.py": "b = 2\n",
                                     "c.py": "c = 3\n"})
    for seed in range(5):
        train, held = split_repo_files(root, 0.1, seed)
        assert held and set(held) <= {"a.py", "b.py", "c.py"}
        assert len(train) + len(held) == 64
    prose = write(tmp_path / "prose", {**docs, "one.py": "x = 1\n"})
    assert any(p.endswith(".md") for p in split_repo_files(prose, 0.1, 0)[1])


def test_git_sources_clone_shallow_or_skip(tmp_path, caplog):
    repo = write(tmp_path / "upstream", {"pkg/mod.py": "def f():\n    return 1\n"})
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "init"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    url, missing = f"file://{repo}", f"file://{tmp_path}/nowhere.git"
    args = args_for(tmp_path, sources=[url, missing], git_cache_dir=str(tmp_path / "cache"))
    files = collect_files(args)
    assert [f.path for f in files] == ["pkg/mod.py"] and files[0].root.parent == tmp_path / "cache"
    assert "nowhere.git" in caplog.text and "git clone failed" in caplog.text


def test_hf_datasets_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    args = DataArgs(hf_datasets=[{"path": "bigcode/the-stack-smol"}], min_doc_tokens=0)
    with pytest.raises(RuntimeError, match="pip install datasets"):
        next(fot_batches(args, CharTokenizer()))


def test_data_args_schedule_and_toml_round_trip():
    args = DataArgs.from_dict({"sources": "src", "d_schedule": [[500, 3], [0, 1]], "languages": ["py"]})
    assert [args.range_at(s) for s in (0, 499, 500, 10_000)] == [1, 1, 3, 3]
    assert args.sources == ["src"] and args.languages == [".py"]
    assert DataArgs.from_dict(args.to_dict()) == args
    with pytest.raises(ValueError, match="unknown"):
        DataArgs.from_dict({"batchsize": 8})
    with pytest.raises(ValueError, match="multiple of pack"):
        DataArgs(batch_size=6, pack=4)
