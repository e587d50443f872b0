"""indexer.pipeline end to end on real code: incremental re-encoding, renames, deletes, rebuild
equivalence, kill -9 and resume, CLI output, model mismatch.

Test Data: copies of the stdlib `json` package (and, for the kill test, `email`), which nobody here
wrote, indexed with a seeded tiny random LongLLaMA that uses the real SmolLM2 tokenizer
(tests/helpers_models.py). The watcher has its own file, tests/test_watcher.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers_models import smol_tokenizer_dir, tiny_model_dir, write_tiny_model  # noqa: F401
from helpers_store import start_writer

from indexer.pipeline import Indexer
from indexer.store import Store, disk_bytes
from longllama_lsp.cli import main as cli_main
from longllama_lsp.errors import StoreMismatch

STDLIB = Path(json.__file__).parent.parent
REPO = Path(__file__).resolve().parents[1]
CHUNK_TOKENS = 96  # under the tiny model's 128-token window, so files make many chunks


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir, one_thread):  # noqa: F811
    from longllama_lsp.model.loading import load_model, load_tokenizer

    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir), tiny_model_dir


def copy_packages(dest: Path, *packages: str) -> Path:
    for name in packages:
        shutil.copytree(STDLIB / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "test", "tests"))
    return dest


@pytest.fixture(scope="module")
def template(tiny, tmp_path_factory) -> Path:
    """A copy of `json`, indexed once; tests start from copies of it (mtimes kept: nothing to redo)."""
    root = copy_packages(tmp_path_factory.mktemp("template"), "json")
    with open_ix(root, tiny) as ix:
        ix.index()
    return root


@pytest.fixture
def repo(template, tmp_path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(template, root)  # copy2 keeps mtimes: the copy is already up to date
    return root


def open_ix(root: Path, tiny, db_path: Path | None = None) -> Indexer:
    model, tok, model_dir = tiny
    return Indexer.open(root, model, tok, model_dir, db_path=db_path, chunk_tokens=CHUNK_TOKENS)


# -- helpers -------------------------------------------------------------------------------------

def digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def bank_contents(ix: Indexer) -> Counter:
    """Multiset of (path, content_hash, digest of the chunk's keys and values in every memory layer)."""
    memory = ix.bank.memory()
    out = Counter()
    for chunk_id, row in ix.bank.resident().items():
        s = ix.bank.chunk_slots(chunk_id)
        tensors = "".join(digest(c.keys[0, :, s.start:s.stop]) + digest(c.values[0, :, s.start:s.stop])
                          for _, c in sorted(memory.items()))
        out[(row.path, row.content_hash, tensors)] += 1
    return out


def tables(db: Path) -> dict[str, list]:
    """files / chunks / memories rows without ids and timestamps; memory blobs as digests."""
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return {
            "files": con.execute("SELECT path, content_hash, size, mtime_ns, language, decode, status, "
                                 "skip_reason FROM files ORDER BY path").fetchall(),
            "chunks": con.execute("SELECT path, ordinal, start_byte, end_byte, start_line, end_line, symbol, "
                                  "kind, token_count, content_hash FROM chunks ORDER BY path, ordinal").fetchall(),
            "memories": con.execute("SELECT memory_key, fingerprint, n_tokens, dtype, shape, layers, nbytes, "
                                    "mask, sha256(data) FROM memories ORDER BY memory_key").fetchall()
            if _has_sha256(con) else
            [(*r[:-1], hashlib.sha256(r[-1]).hexdigest()) for r in con.execute(
                "SELECT memory_key, fingerprint, n_tokens, dtype, shape, layers, nbytes, mask, data "
                "FROM memories ORDER BY memory_key")],
        }
    finally:
        con.close()


def _has_sha256(con: sqlite3.Connection) -> bool:
    try:
        con.execute("SELECT sha256('')")
        return True
    except sqlite3.OperationalError:
        return False


def hashes(ix: Indexer, path: str | None = None) -> set[str]:
    return {c.content_hash for c in ix.store.chunks(path)}


def orphans(store: Store) -> int:
    """Memory rows no chunk refers to."""
    return store.db.execute("SELECT count(*) FROM memories WHERE memory_key NOT IN "
                            "(SELECT memory_key FROM chunks)").fetchone()[0]


def edit_function(path: Path, name: str, line: str = "    _edited = True  # edited\n") -> None:
    """Insert `line` as the first body line of `def name(` (after its signature)."""
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, s in enumerate(lines) if s.lstrip().startswith(f"def {name}("))
    sig_end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith(":"))
    indent = len(lines[sig_end + 1]) - len(lines[sig_end + 1].lstrip())
    lines.insert(sig_end + 1, " " * indent + line.lstrip())
    path.write_text("".join(lines))


# -- incremental indexing ------------------------------------------------------------------------

def test_second_run_encodes_nothing(repo, tiny):
    with open_ix(repo, tiny) as ix:
        summary = ix.index()
        assert summary.chunks_encoded == 0 and summary.files_changed == 0
        assert summary.files_indexed == 5 and summary.chunks > 50
        assert len(ix.bank) == summary.chunks  # the bank was loaded from the store, not re-encoded
        assert ix.encoder.stats.chunks == 0


def test_a_pass_asks_the_store_for_missing_memories_once_per_step_not_per_empty_tier(repo, tiny, monkeypatch):
    """chunks_missing_memory is a LEFT JOIN over the chunks: one full query (the bank's first load), then
    per tier that has files one filtered by its paths to encode and one to bank what changed."""
    asked = []
    real = Store.chunks_missing_memory
    monkeypatch.setattr(Store, "chunks_missing_memory", lambda self, paths=None: asked.append(
        None if paths is None else set(paths)) or real(self, paths))
    edit_function(repo / "json/decoder.py", "JSONObject")
    with open_ix(repo, tiny) as ix:
        summary = ix.index()  # no editor: one tier, the rest, in walk order
        files = {f.path for f in ix.store.files()}
    assert 1 <= summary.chunks_encoded <= 8  # the function's chunks, those whose context holds the edit
    assert asked == [None, files, {"json/decoder.py"}]


@pytest.mark.parametrize("via", ["index", "update"])
def test_editing_one_function_reencodes_only_its_chunks(repo, tiny, via):
    with open_ix(repo, tiny) as ix:
        ix.index()
        before_all, before_file = hashes(ix), ix.store.chunks("json/decoder.py")
        before_keys = {c.memory_key for c in ix.store.chunks()}
        edit_function(repo / "json/decoder.py", "JSONObject")
        summary = ix.index() if via == "index" else ix.update([repo / "json/decoder.py"])
        after_file = ix.store.chunks("json/decoder.py")
        new = {c.content_hash for c in after_file} - before_all
        assert 1 <= len(new) <= 3  # the function's chunk(s), nothing else
        assert all(c.symbol and "JSONObject" in c.symbol for c in after_file if c.content_hash in new)
        # encoded: the new chunks and the chunks after them whose context (the text before them that their
        # memory is encoded after) holds the edit; no other
        rekeyed = [c for c in after_file if c.memory_key not in before_keys]
        assert summary.chunks_encoded == len(rekeyed) == ix.encoder.stats.chunks > len(new)
        edit_start = min(c.start_byte for c in after_file if c.content_hash in new)
        edit_end = max(c.end_byte for c in after_file if c.content_hash in new)
        assert all(edit_end <= c.start_byte < edit_end + ix.context_chars
                   for c in rekeyed if c.content_hash not in new)
        assert all(c.memory_key in before_keys for c in after_file if c.start_byte < edit_start)
        # the other chunks of the file keep their content hash, i.e. their memory
        unchanged = [c for c in after_file if c.content_hash not in new]
        assert len(unchanged) >= len(before_file) - 3
        assert Counter((r.path, r.content_hash) for r in ix.bank.resident().values()) == \
            Counter((r.path, r.content_hash) for r in ix.store.chunks())
        # the summary line (`longllama watch` prints it per save) counts the repository, not the save
        indexed = sum(f.status == "indexed" for f in ix.store.files())
        assert (summary.files_indexed, summary.chunks) == (indexed, len(ix.store.chunks()))


def test_saved_edits_leave_no_memory_behind(repo, tiny):
    """Each save re-encodes the edited chunks and those after them; the memories they replace go at once
    (they stayed until the next full pass: 15 saves of a 280-line file under `longllama watch` grew its
    index from 4.7 to 8.0 MB, and a day of saves at the top of a large file by gigabytes)."""
    path = repo / "json/decoder.py"
    with open_ix(repo, tiny) as ix:
        ix.index()
        for i in range(3):
            path.write_text(f"# save {i}\n" + path.read_text())
            ix.update([path])
        stored = {k for (k,) in ix.store.db.execute("SELECT memory_key FROM memories")}
        assert stored == {c.memory_key for c in ix.store.chunks()}


def banked(ix: Indexer, path: str) -> dict[str, str]:
    """The bank's chunks of `path`: content hash -> the memory key of the memory each holds."""
    return {m.content_hash: ix.bank.content_of(c) for c, m in ix.bank.chunks_of(path).items()}


def test_a_saved_edit_reaches_the_bank_before_the_chunks_after_it_are_reencoded(repo, tiny):
    """update() encodes the edited text first and banks it; meanwhile the chunks below it, whose text is
    unchanged but whose memory is re-encoded after the new text before them, keep their old memory."""
    path = "json/decoder.py"
    with open_ix(repo, tiny) as ix:
        ix.index()
        old = banked(ix, path)
        edit_function(repo / path, "JSONObject")
        seen, encode = [], ix.encoder.encode

        def watching(texts, *args, **kwargs):
            seen.append((len(texts), banked(ix, path)))
            return encode(texts, *args, **kwargs)

        ix.encoder.encode = watching
        ix.update([repo / path])
        rows = {c.content_hash: c.memory_key for c in ix.store.chunks(path)}
        new_text = set(rows) - set(old)
        rekeyed = {h for h in set(rows) & set(old) if rows[h] != old[h]}
        assert new_text and rekeyed
        assert [n for n, _ in seen] == [len(new_text), len(rekeyed)]  # two rounds: the edit, then below it
        between = seen[1][1]  # the bank while the chunks below the edit are re-encoded
        assert set(between) == set(rows)  # no chunk of the file is missing from memory meanwhile
        assert {h: between[h] for h in new_text} == {h: rows[h] for h in new_text}  # the edit: its new memory
        assert {h: between[h] for h in rekeyed} == {h: old[h] for h in rekeyed}  # below it: the old one
        assert banked(ix, path) == rows  # and at the end, every chunk its own memory


def test_a_reader_keeps_old_memory_of_unchanged_text_while_the_writer_reencodes_it(repo, tiny):
    """An index read as another process writes it (a server beside `longllama watch`): the writer commits a
    file's new chunk rows before their memories; the reader's bank keeps the chunks whose text did not
    change (with their old memory) instead of dropping them until the writer has re-encoded them."""
    path = "json/decoder.py"
    model, tok, model_dir = tiny
    with open_ix(repo, tiny) as writer, \
            Indexer.open(repo, model, tok, model_dir, chunk_tokens=CHUNK_TOKENS, readonly=True) as reader:
        writer.index()
        reader.index()
        old = banked(reader, path)
        edit_function(repo / path, "JSONObject")
        during, encode = [], writer.encoder.encode

        def follow_first(texts, *args, **kwargs):  # the reader looks before the writer's first encode
            if not during:
                reader.follow_writer()
                during.append(banked(reader, path))
            return encode(texts, *args, **kwargs)

        writer.encoder.encode = follow_first
        writer.update([repo / path])
        rows = {c.content_hash: c.memory_key for c in writer.store.chunks(path)}
        unchanged = set(rows) & set(old)
        assert during[0] == {h: old[h] for h in unchanged}  # every unchanged text, with its old memory
        reader.follow_writer()
        assert banked(reader, path) == rows


def test_rename_reencodes_nothing(repo, tiny):
    with open_ix(repo, tiny) as ix:
        ix.index()
        old = hashes(ix, "json/scanner.py")
        (repo / "json/scanner.py").rename(repo / "json/lexer.py")
        summary = ix.update([repo / "json/scanner.py", repo / "json/lexer.py"])  # what the watcher sends
        assert summary.chunks_encoded == 0
        paths = {r.path for r in ix.bank.resident().values()}
        assert "json/lexer.py" in paths and "json/scanner.py" not in paths
        assert hashes(ix, "json/lexer.py") == old
        # the same through a full pass (rename back)
        (repo / "json/lexer.py").rename(repo / "json/scanner.py")
        summary = ix.index()
        assert summary.chunks_encoded == 0 and summary.files_deleted == 1
        assert "json/lexer.py" not in {r.path for r in ix.bank.resident().values()}


@pytest.mark.parametrize("via", ["index", "update"])
def test_delete_removes_memory_from_bank_and_store(repo, tiny, via):
    with open_ix(repo, tiny) as ix:
        ix.index()
        only_there = hashes(ix, "json/encoder.py") - _others(ix, "json/encoder.py")
        assert only_there
        tokens = ix.bank.status().live_tokens
        (repo / "json/encoder.py").unlink()
        summary = ix.index() if via == "index" else ix.update(["json/encoder.py"])
        assert summary.files_deleted == 1 and summary.chunks_encoded == 0
        assert all(r.path != "json/encoder.py" for r in ix.bank.resident().values())
        assert ix.bank.status().live_tokens < tokens
        assert ix.store.chunks("json/encoder.py") == [] and ix.store.file("json/encoder.py") is None
        if via == "update":  # per-file updates keep memories (content may come back) until gc
            ix.store.gc()
        assert not any(ix.store.get_memory(h) for h in only_there)
        assert orphans(ix.store) == 0


def test_a_full_pass_gives_the_space_of_deleted_files_back(repo, tiny, monkeypatch):
    """SQLite never shrinks a file: an index whose files went (WTForms' translation catalogs) kept its size."""
    import indexer.store

    monkeypatch.setattr(indexer.store, "COMPACT_MIN_FREE_BYTES", 0)  # the tiny model's index is small
    with open_ix(repo, tiny) as ix:
        ix.index()
        before = disk_bytes(ix.store.path)
        for path in repo.glob("json/*.py"):
            if path.name != "tool.py":
                path.unlink()
        ix.index()
        assert disk_bytes(ix.store.path) < before / 2 and orphans(ix.store) == 0
        assert {f.path for f in ix.store.files()} == {"json/tool.py"}


AWS_LINE = 'KEY = "AKIAQWERTYUIOPASDFGH"\n'  # detect-secrets' AWSKeyDetector matches it


def test_file_swapped_for_a_symlink_after_the_walk_is_never_read(repo, tiny, tmp_path, monkeypatch):
    """Between the walk (which saw a regular json/tool.py) and the read, the file becomes a link to a
    secret outside the repository, as a process racing the indexer could make it. The pass opens it
    without following links: a skipped row, no chunks, nothing of the outside file in the index."""
    import indexer.pipeline as pipeline

    outside = tmp_path / "outside.py"
    outside.write_text("def stolen():\n    return 'OUTSIDE_7c1e'\n" + AWS_LINE)
    target = repo / "json/tool.py"
    walk = pipeline.walk_with_skips

    def walk_then_swap(*args, **kwargs):
        decisions = list(walk(*args, **kwargs))
        target.unlink()
        target.symlink_to(outside)
        return iter(decisions)

    monkeypatch.setattr(pipeline, "walk_with_skips", walk_then_swap)
    with open_ix(repo, tiny) as ix:
        ix.index()
        row = ix.store.file("json/tool.py")
        assert row.status == "skipped" and "symlink" in row.skip_reason, row
        assert ix.store.chunks("json/tool.py") == []
        assert all(r.path != "json/tool.py" for r in ix.bank.resident().values())
        assert "OUTSIDE_7c1e" not in "".join(ix._texts.values())


def test_a_pass_with_nothing_to_do_scans_no_file_for_secrets(repo, tiny, monkeypatch):
    """The content rules run on the bytes a pass reads, and an unchanged file (size, mtime) is not read:
    a no-op pass scanned every file for secrets (3 s on a 2.5 MB tree), now none; a changed one, once."""
    import indexer.walker as walker

    scanned = []
    scan = walker.looks_like_secret
    monkeypatch.setattr(walker, "looks_like_secret", lambda text, rel: scanned.append(rel) or scan(text, rel))
    with open_ix(repo, tiny) as ix:
        assert ix.index().files_changed == 0
        assert scanned == []
        (repo / "json/tool.py").write_text((repo / "json/tool.py").read_text() + "\n# changed\n")
        assert ix.index().files_changed == 1
        assert scanned == ["json/tool.py"]


def test_an_upgraded_secret_detector_checks_every_stored_file_again_once(repo, tiny, monkeypatch):
    """The detector's version is part of the content rules a stored size/mtime vouches for: a newer
    detect-secrets may flag what the last one let through, so unchanged files are read and scanned."""
    import indexer.pipeline as pipeline
    import indexer.walker as walker

    scanned = []
    scan = walker.looks_like_secret
    monkeypatch.setattr(walker, "looks_like_secret", lambda text, rel: scanned.append(rel) or scan(text, rel))
    monkeypatch.setattr(pipeline, "DETECTOR_VERSION", "detect-secrets 99.0")
    with open_ix(repo, tiny) as ix:
        assert ix.index().chunks_encoded == 0  # read again, same content: no model time
        assert sorted(scanned) == sorted(f.path for f in ix.store.files() if f.status == "indexed")
        scanned.clear()
        ix.index()
        assert scanned == []  # once: the new version is the stored one now


def test_an_edit_of_our_own_secret_rules_changes_the_detector_version(tmp_path, monkeypatch):
    """The gitleaks restatements and secret file names are ours, not detect-secrets': a release that adds
    a rule must check stored files again as a detect-secrets upgrade does (the test above)."""
    import importlib.util

    import indexer.secrets as secrets

    source = Path(secrets.__file__).read_text()
    rule = '_gitleaks("npm-access-token", r"\\bnpm_[A-Za-z0-9]{36}\\b"),'
    assert rule in source
    edited = tmp_path / "secrets_edited.py"
    edited.write_text(source.replace(rule, rule + '\n    _gitleaks("new-token", r"\\bnew_[A-Za-z0-9]{36}\\b"),'))
    spec = importlib.util.spec_from_file_location("secrets_edited", edited)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "secrets_edited", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert len(module.GITLEAKS_RULES) == len(secrets.GITLEAKS_RULES) + 1
    assert module.DETECTOR_VERSION != secrets.DETECTOR_VERSION


def test_turning_include_secrets_off_drops_an_unchanged_secret_file(repo, tiny):
    """A file's stored size and mtime spare reading it only under the content rules it was checked by:
    indexed with include_secrets, an unchanged secret file leaves the index once that is off again."""
    from indexer.walker import WalkRules

    (repo / "json/keys.py").write_text(AWS_LINE)
    model, tok, model_dir = tiny
    with Indexer.open(repo, model, tok, model_dir, chunk_tokens=CHUNK_TOKENS,
                      rules=WalkRules(include_secrets=True)) as ix:
        ix.index()
        assert ix.store.file("json/keys.py").status == "indexed"
    with open_ix(repo, tiny) as ix:
        summary = ix.index()
        row = ix.store.file("json/keys.py")
        assert row.status == "skipped" and row.skip_reason.startswith("secret: AWS Access Key"), row
        assert ix.store.chunks("json/keys.py") == [] and ("json/keys.py", row.skip_reason) in summary.skipped
        assert all(r.path != "json/keys.py" for r in ix.bank.resident().values())


def test_ignored_file_leaves_and_comes_back(repo, tiny):
    with open_ix(repo, tiny) as ix:
        ix.index()
        (repo / ".longllamaignore").write_text("json/tool.py\n")
        summary = ix.index()
        assert summary.files_deleted == 1 and summary.files_skipped == 1
        assert all(r.path != "json/tool.py" for r in ix.bank.resident().values())
        [(path, reason)] = [s for s in ix.store.stats().skipped if s[0] == "json/tool.py"]
        assert ".longllamaignore" in reason
        (repo / ".longllamaignore").unlink()  # json/tool.py itself is unchanged (same size and mtime)
        ix.index()
        assert ix.store.file("json/tool.py").status == "indexed"
        assert any(r.path == "json/tool.py" for r in ix.bank.resident().values())


def _others(ix: Indexer, path: str) -> set[str]:
    return {c.content_hash for c in ix.store.chunks() if c.path != path}


def test_bank_equals_fresh_rebuild_after_edits(repo, tiny, tmp_path):
    """After a sequence of edits, the bank (and the tables) equal a from-scratch index, bit for bit."""
    with open_ix(repo, tiny) as ix:
        ix.index()
        decoder = repo / "json/decoder.py"
        original = decoder.read_text()
        edit_function(decoder, "py_scanstring")
        ix.update([decoder])
        shutil.copy(repo / "json/tool.py", repo / "json/tool_copy.py")  # duplicate content: shared memory
        (repo / "json/scanner.py").rename(repo / "json/lexer.py")
        ix.update(["json/tool_copy.py", "json/scanner.py", "json/lexer.py"])
        edit_function(repo / "json/encoder.py", "py_encode_basestring", "    s = s  # a\n")
        (repo / "json/__init__.py").unlink()
        ix.index()
        decoder.write_text(original)  # revert: its old memories are gone after gc, encoded again
        (repo / "json/sub").mkdir()
        (repo / "json/sub/extra.py").write_text("def extra(x):\n    return x + 1\n")
        ix.update([decoder, repo / "json/sub"])
        ix.store.gc()
        incremental = bank_contents(ix)
        db = ix.store.path
    fresh_root = tmp_path / "fresh"
    shutil.copytree(repo, fresh_root, ignore=shutil.ignore_patterns(".longllama"))
    with open_ix(fresh_root, tiny, db_path=tmp_path / "fresh.db") as fresh:
        fresh.index()
        rebuilt = bank_contents(fresh)
    assert sum(incremental.values()) > 50
    assert {(p, h) for p, h, _ in incremental} == {(p, h) for p, h, _ in rebuilt}
    assert incremental == rebuilt  # same tensors, bit for bit, whatever batch each chunk was encoded in
    ours, theirs = tables(db), tables(tmp_path / "fresh.db")
    assert ours["chunks"] == theirs["chunks"] and ours["memories"] == theirs["memories"]
    assert [r[:2] for r in ours["files"]] == [r[:2] for r in theirs["files"]]


def test_chunks_never_outgrow_the_window(tiny, tmp_path):
    """--chunk-tokens above the model's window is clamped: every memory covers its whole chunk."""
    model, tok, model_dir = tiny
    repo = small_repo(tmp_path / "repo")
    with Indexer.open(repo, model, tok, model_dir, chunk_tokens=4096) as ix:
        assert ix.chunk_tokens == model.window == 128
        ix.index()
        n_tokens = {k: m.num_tokens for k, m in ix.store.iter_memories()}
        assert all(n_tokens[c.memory_key] == c.token_count <= 128 for c in ix.store.chunks())


# -- kill -9 and resume --------------------------------------------------------------------------

KILL_DRIVER = """
import os, random, signal, sys, time
import torch
torch.set_num_threads(1)  # no OpenMP threads yet: forking below is safe
import indexer.pipeline as p
from longllama_lsp.cli import main

p.ENCODE_BATCH_CHUNKS = 8  # many small commits: kills land between and inside them
root, model_dir, chunk_tokens, rounds = sys.argv[1:5]
argv = ["index", root, "--model", model_dir, "--chunk-tokens", chunk_tokens, "-q"]
rng, kills = random.Random(1234), 0
# The imports above take most of a start; forked children skip them, so many kills stay cheap.
for attempt in range(int(rounds) + 1):
    pid = os.fork()
    if pid == 0:
        os._exit(main(argv))
    if attempt < int(rounds):
        time.sleep(rng.uniform(0.5, 3.0))
        done, status = os.waitpid(pid, os.WNOHANG)  # a run that ended by itself is reaped here
        if done == 0:
            os.kill(pid, signal.SIGKILL)  # mid-index: no cleanup, no atexit; the kernel drops the lock
            kills += 1
            os.waitpid(pid, 0)
        continue
    _, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status  # the last run, never killed, completes
print(f"kills={kills}")
"""


@pytest.mark.slow
def test_kill9_mid_index_then_resume_equals_uninterrupted(tiny, tmp_path):
    """SIGKILL `longllama index` at random moments, resume: the database equals an uninterrupted run's."""
    root = copy_packages(tmp_path / "killed", "json", "email")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(root), str(tiny[2]), str(CHUNK_TOKENS), "5"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kills = int(done.stdout.split("kills=")[1])
    assert kills >= 2, done.stdout
    [db] = (root / ".longllama").glob("index-*.db")
    reference_root = copy_packages(tmp_path / "reference", "json", "email")
    for src, dst in zip(sorted(root.rglob("*.py")), sorted(reference_root.rglob("*.py")), strict=True):
        shutil.copystat(src, dst)  # same mtimes, so the files rows compare equal
    with open_ix(reference_root, tiny, db_path=tmp_path / "reference.db") as ix:
        ix.index()
    resumed, reference = tables(db), tables(tmp_path / "reference.db")
    assert resumed["files"] == reference["files"]
    assert resumed["chunks"] == reference["chunks"]
    assert resumed["memories"] == reference["memories"]
    with Store.open(db, None, readonly=True) as store:
        assert store.check() == []
        assert orphans(store) == 0 and store.stats().chunks_missing_memory == 0


# -- priority: useful first ------------------------------------------------------------------------

def test_open_file_and_its_imports_are_in_memory_before_the_rest_is_read(tiny, tmp_path, monkeypatch):
    import indexer.priority

    monkeypatch.setattr(indexer.priority, "READY_BYTES", 60_000)  # utils.py and both its imports (52 kB)
    root = copy_packages(tmp_path / "repo", "email")
    seen = []

    def progress(p):
        if p.phase == "ready":  # what the bank holds right now, and which files were chunked so far
            seen.append((p.message, {r.path for r in ix.bank.resident().values()}, {f.path for f in ix.store.files()}))

    with open_ix(root, tiny) as ix:
        summary = ix.index(progress=progress, priority_paths=[root / "email/utils.py"])
        everything = {r.path for r in ix.bank.resident().values()}
    tiers = dict((name, (banked, scanned)) for name, banked, scanned in seen)
    assert list(tiers) == ["open files", "their imports"]
    banked, scanned = tiers["open files"]
    assert banked == scanned == {"email/utils.py"}  # nothing else even read yet
    banked, scanned = tiers["their imports"]
    assert banked == scanned == {"email/utils.py", "email/_parseaddr.py", "email/charset.py"}
    assert len(banked) < len(everything) / 2 and "email/mime/image.py" in everything
    assert summary.ready_files == len(banked) and 0 < summary.ready_seconds < summary.seconds


# -- CLI -----------------------------------------------------------------------------------------

def test_cli_explain(repo, capsys):
    (repo / ".gitignore").write_text("generated/\n")
    (repo / "generated").mkdir()
    (repo / "generated/out.py").write_text("x = 1\n")
    (repo / ".env").write_text("API_KEY=abc\n")
    for path, verdict in [("json/decoder.py", "json/decoder.py: indexed ("),
                          ("generated/out.py", "not indexed ("), (".env", ".env: not indexed (")]:
        assert cli_main(["index", str(repo), "--explain", path]) == 0
        out = capsys.readouterr().out.strip()
        assert verdict in out and out.endswith(")"), out
    assert cli_main(["index", str(repo), "--explain", "generated/out.py"]) == 0
    assert ".gitignore" in capsys.readouterr().out


def small_repo(root: Path) -> Path:
    (root / "json").mkdir(parents=True)
    for name in ("scanner.py", "tool.py"):
        shutil.copy2(STDLIB / "json" / name, root / "json" / name)
    return root


def test_cli_index_and_status(tiny, capsys, tmp_path):
    repo = small_repo(tmp_path / "repo")
    assert cli_main(["status", str(repo)]) == 1
    assert "not indexed yet" in capsys.readouterr().out
    (repo / "blob.bin").write_bytes(b"\x00\x01" * 100)
    args = ["index", str(repo), "--model", str(tiny[2]), "--chunk-tokens", str(CHUNK_TOKENS), "-q"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"indexed {repo.resolve()}: 2 files (2 changed, 0 deleted, ")
    assert "database: " in out and "tokens/s" in out
    assert cli_main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["chunks_encoded"] == 0 and summary["files_indexed"] == 2
    assert cli_main(["status", str(repo)]) == 0
    status = capsys.readouterr().out
    [db] = (repo / ".longllama").glob("index-*.db")
    with Store.open(db, None, readonly=True) as store:
        stats = store.stats()
    assert f"files:    {stats.files}\n" in status and f"chunks:   {stats.chunks} (0 not encoded yet)" in status
    assert f"tokens:   {stats.tokens}\n" in status and "mem_layers [1]" in status
    assert "blob.bin: " in status  # skipped files are listed with their reason
    assert "stale" not in status
    assert cli_main(["status", str(repo), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["chunks"] == stats.chunks and as_json["chunks_missing_memory"] == 0
    # an index whose chunks were encoded alone (built before memory contexts) is named stale
    model, tok, model_dir = tiny
    with Indexer.open(repo, model, tok, model_dir, chunk_tokens=CHUNK_TOKENS, context_chars=0) as ix:
        ix.index()
    assert cli_main(["status", str(repo)]) == 0
    status = capsys.readouterr().out
    assert status.count("index:    ") == 2 and status.count("  stale:  its chunks were encoded alone") == 1
    # an index an older version wrote (a migration pending) is named stale; the others are still shown
    old = db.with_name("index-000000000000.db")
    shutil.copy(db, old)
    with sqlite3.connect(old) as con:
        con.execute("DELETE FROM _sqlite_migrations WHERE name = 'm004_memory_key'")
    assert cli_main(["status", str(repo)]) == 0
    status = capsys.readouterr().out
    assert status.count("index:    ") == 3 and "written by an older version of longllama" in status
    assert f"files:    {stats.files}\n" in status
    # --delete-stale deletes both stale ones with their side and lock files, not the current one, and
    # keeps a stale index while another process writes it
    [alone] = set((repo / ".longllama").glob("index-*.db")) - {db, old}
    with Indexer.open(repo, model, tok, model_dir, chunk_tokens=CHUNK_TOKENS, context_chars=0):
        assert cli_main(["status", str(repo), "--delete-stale"]) == 0
    err = capsys.readouterr().err
    assert f"deleted {old}" in err and f"kept {alone}: " in err and "being written by another process" in err
    assert not old.exists() and alone.exists()
    assert cli_main(["status", str(repo), "--delete-stale", "--json"]) == 0
    assert f"deleted {alone}" in capsys.readouterr().err
    left = sorted(p.name for p in (repo / ".longllama").iterdir())
    assert [n for n in left if n.startswith("index-")] == [n for n in left if n.startswith(db.name)]
    assert cli_main(["status", str(repo)]) == 0 and "stale" not in capsys.readouterr().out


def test_cli_noop_index_status_and_explain_never_load_the_model(tiny, capsys, tmp_path, monkeypatch):
    import indexer.commands as commands

    loads = []
    real = commands.load_model_for
    monkeypatch.setattr(commands, "load_model_for", lambda *a, **k: loads.append(1) or real(*a, **k))
    repo = small_repo(tmp_path / "repo")
    args = ["index", str(repo), "--model", str(tiny[2]), "--chunk-tokens", str(CHUNK_TOKENS), "-q"]
    assert cli_main(args) == 0 and len(loads) == 1
    assert "usable now: all 2 files are in memory" in capsys.readouterr().out
    assert cli_main(args) == 0  # nothing changed: no model
    assert cli_main(["status", str(repo)]) == 0
    assert cli_main(args + ["--explain", "json/tool.py"]) == 0
    (repo / "json/tool.py").unlink()  # a deletion needs no model either
    assert cli_main(args) == 0
    assert len(loads) == 1
    assert "1 files (0 changed, 1 deleted" in capsys.readouterr().out
    (repo / "json/new.py").write_text("def added():\n    return 1\n")
    assert cli_main(args) == 0 and len(loads) == 2  # new content: now it loads


def test_a_folder_with_nothing_to_index_says_so(tiny, capsys, tmp_path, caplog):
    """`longllama index` of an empty folder said "usable now: all 0 files are in memory", and `ask` there
    answered (about "a Python-based open-source project") with nothing said about its empty memory."""
    from longllama_lsp.cli import main as longllama

    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 8)
    assert cli_main(["index", str(tmp_path), "--model", str(tiny[2]), "-q"]) == 0
    out = capsys.readouterr().out
    assert "nothing to remember" in out and "1 skipped" in out and "usable now" not in out
    assert longllama(["ask", "What is this?", "--repo", str(tmp_path), "--model", str(tiny[2]), "--max-tokens", "1",
                      "--no-server"]) == 0
    assert f"nothing in {tmp_path.resolve()} to remember" in caplog.text


def test_cli_index_loads_the_tokenizer_once(tiny, capsys, tmp_path, monkeypatch):
    """Chunking loads the tokenizer; the model, loaded later for encoding, is encoded with that one."""
    import longllama_lsp.model.loading as loading

    loads = []
    real = loading.load_tokenizer
    monkeypatch.setattr(loading, "load_tokenizer", lambda *a, **k: loads.append(1) or real(*a, **k))
    repo = small_repo(tmp_path / "repo")
    assert cli_main(["index", str(repo), "--model", str(tiny[2]), "--chunk-tokens", str(CHUNK_TOKENS), "-q"]) == 0
    assert "usable now: all 2 files are in memory" in capsys.readouterr().out  # so every chunk was encoded
    assert len(loads) == 1


def test_cli_one_shot_index_builds_no_bank(tiny, capsys, tmp_path, monkeypatch):
    """`longllama index` exits when done: a bank would only allocate device memory (CUDA on a GPU
    machine) and plan every stored chunk out of a zero budget, per tier."""
    from indexer.bank import MemoryBank

    banked = []
    for name in ("__init__", "load_from_store"):
        real = getattr(MemoryBank, name)
        monkeypatch.setattr(MemoryBank, name, lambda *a, _real=real, _name=name, **k: banked.append(_name)
                            or _real(*a, **k))
    repo = small_repo(tmp_path / "repo")
    args = ["index", str(repo), "--model", str(tiny[2]), "--chunk-tokens", str(CHUNK_TOKENS), "-q",
            "--first", str(repo / "json/tool.py")]
    assert cli_main(args) == 0
    assert "usable now: all 2 files are in memory" in capsys.readouterr().out
    (repo / "json/scanner.py").unlink()  # a deletion, then an edit: no bank to drop them from either
    (repo / "json/tool.py").write_text("def edited():\n    return 2\n")
    assert cli_main(args) == 0
    assert "1 files (1 changed, 1 deleted" in capsys.readouterr().out
    assert banked == []


def test_an_indexer_without_a_device_has_no_bank_to_hand_the_engine(tiny, tmp_path):
    """The one-shot index keeps nothing on a device: its `bank`, which repository.MemorySource promises
    the engine, is an error to ask for (not a None the engine would fail on later); the pass, its
    status and one update still run."""
    from indexer.encoder import LazyEncoder

    repo = small_repo(tmp_path / "repo")
    model, _, model_dir = tiny
    with Indexer.open_checkpoint(repo, model_dir, LazyEncoder(model_dir, lambda: model), device=None,
                                 chunk_tokens=CHUNK_TOKENS) as ix:
        assert ix.index().files_indexed == 2
        (repo / "json/tool.py").write_text("def edited():\n    return 2\n")
        assert ix.update(["json/tool.py"]).files_changed == 1
        assert ix.status()["bank"] is None
        with pytest.raises(RuntimeError, match="no memory on a device"):
            ix.bank  # noqa: B018


def test_cli_status_imports_neither_torch_nor_transformers_and_a_noop_index_no_transformers(tiny, tmp_path):
    repo = small_repo(tmp_path / "repo")
    assert cli_main(["index", str(repo), "--model", str(tiny[2]), "--chunk-tokens", str(CHUNK_TOKENS), "-q"]) == 0
    code = ("import sys; from longllama_lsp.cli import main; rc = main(['status', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert "files:    2" in done.stdout
    assert done.stdout.rstrip().endswith("[]")  # 20-40 s of imports on a busy machine, for reading SQLite
    noop = code.replace("['status', sys.argv[1]]", "['index', sys.argv[1], '--model', sys.argv[2], '-q', "
                        f"'--chunk-tokens', '{CHUNK_TOKENS}']")
    done = subprocess.run([sys.executable, "-c", noop, str(repo), str(tiny[2])], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.stdout.rstrip().endswith("['torch']")  # a no-op index reads tensors' dtypes, never transformers


def test_the_cli_loads_a_tokenizer_without_unknown_model_type_warnings(tiny):
    """The CLI defers the Auto classes' registration; AutoTokenizer still reads our config.json."""
    code = ("import sys, longllama_lsp; longllama_lsp.defer_model_registration = True; "
            "from longllama_lsp.model.loading import load_tokenizer; load_tokenizer(sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", code, str(tiny[2])], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert "model of type" not in done.stderr, done.stderr


def test_fingerprint_from_checkpoint_files_matches_the_model_and_follows_its_files(tiny, tmp_path):
    from indexer.pipeline import checkpoint_fingerprint, fingerprint_for

    model, _, model_dir = tiny
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    fp = checkpoint_fingerprint(copy)
    assert fp == fingerprint_for(model, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: same size, new mtime
    weights.write_bytes(bytes(data))
    changed = checkpoint_fingerprint(copy)
    assert changed.digest != fp.digest
    os.utime(weights, ns=(1, 1))  # content back to the original, mtime older: rehashed, equal again
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([data[-1] ^ 1]))
    assert checkpoint_fingerprint(copy) == fp
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "mem_layers": [0]}))
    assert checkpoint_fingerprint(copy).digest != fp.digest


@pytest.mark.parametrize("command", ["index", "status", "watch"])
def test_cli_nonexistent_root_is_an_error_and_creates_nothing(command, tmp_path, capsys):
    missing = tmp_path / "typo"
    assert cli_main([command, str(missing)]) == 2
    assert f"{missing}: no such directory" in capsys.readouterr().err
    assert not missing.exists()
    afile = tmp_path / "file.py"
    afile.write_text("x = 1\n")
    assert cli_main([command, str(afile)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.py"]


def test_cli_status_names_the_model(tiny, capsys, tmp_path):
    from longllama_lsp.model.loading import memory_training

    repo = small_repo(tmp_path / "repo")
    assert cli_main(["index", str(repo), "--model", str(tiny[2]), "--chunk-tokens", str(CHUNK_TOKENS), "-q"]) == 0
    capsys.readouterr()
    assert cli_main(["status", str(repo)]) == 0
    out = capsys.readouterr().out
    assert f"model:    {tiny[2].name} (fingerprint " in out
    assert f"  path:   {tiny[2]}" in out
    assert f"  memory: {memory_training(tiny[2])}\n" in out  # how its memory layers were trained


def test_cli_status_names_the_model_of_an_index_a_server_built(tiny, capsys, tmp_path):
    """The language server indexes through Indexer.open (a loaded model), not `longllama index`."""
    repo = small_repo(tmp_path / "repo")
    with open_ix(repo, tiny) as ix:
        ix.index()
    assert cli_main(["status", str(repo)]) == 0
    assert f"model:    {tiny[2].name} (fingerprint " in capsys.readouterr().out


def test_cli_status_reports_a_bad_index_file_and_goes_on(tiny, capsys, tmp_path):
    """A repository's own `.longllama/` may hold a symlink named like an index, or a damaged file: status
    says why each is unusable, still shows the good index, and exits 1; the link's target is untouched."""
    repo = small_repo(tmp_path / "repo")
    assert cli_main(["index", str(repo), "--model", str(tiny[2]), "--chunk-tokens", str(CHUNK_TOKENS), "-q"]) == 0
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (repo / ".longllama" / "index-000000000000.db").symlink_to(victim)
    (repo / ".longllama" / "index-ffffffffffff.db").write_bytes(b"not a database" * 100)
    capsys.readouterr()
    assert cli_main(["status", str(repo), "--delete-stale"]) == 1
    out = capsys.readouterr().out
    assert out.count("  unusable: ") == 2 and "is a symlink" in out
    assert f"model:    {tiny[2].name} (fingerprint " in out and victim.read_text() == "keep"


HOSTILE = "\x1b]52;c;ZWNobyBwd25lZA==\x07\rok"  # an OSC 52 clipboard write, then a CR to hide it


def test_cli_status_escapes_control_characters_from_the_store(tiny, capsys, tmp_path):
    """A hostile repository commits its own `.longllama/` and names its files: what status echoes from
    the store (model name, path, source, memory training, skipped files) reaches no terminal raw."""
    repo = small_repo(tmp_path / "repo")
    (repo / f"blob{HOSTILE}.bin").write_bytes(b"\x00\x01" * 100)  # skipped: listed by status
    assert cli_main(["index", str(repo), "--model", str(tiny[2]), "--chunk-tokens", str(CHUNK_TOKENS), "-q"]) == 0
    [db] = (repo / ".longllama").glob("index-*.db")
    hostile = {key: f"{key}{HOSTILE}" for key in ("name", "path", "source", "memory_training")}
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'checkpoint'", [json.dumps(hostile)])
    conn.close()
    capsys.readouterr()
    assert cli_main(["status", str(repo)]) == 0
    out = capsys.readouterr().out
    assert not {"\x1b", "\x07", "\r"} & set(out), out
    escaped = "\\x1b]52;c;ZWNobyBwd25lZA==\\x07\\rok"
    for key in hostile:
        assert f"{key}{escaped}" in out
    assert f"  blob{escaped}.bin: " in out


def test_complete_without_a_server_reads_an_index_another_process_writes(tiny, capsys, caplog, tmp_path):
    """`longllama watch` (or a server) holds the index's writer lock: `complete` and `ask --no-server` read the index
    as it is, read-only (a WAL reader is never blocked), and says so; it failed with 'is being written by
    another process'. The file it completes in is read as it is now, in memory."""
    repo = small_repo(tmp_path / "repo")
    model = str(tiny[2])
    assert cli_main(["index", str(repo), "--model", model, "--chunk-tokens", str(CHUNK_TOKENS), "-q"]) == 0
    [db] = (repo / ".longllama").glob("index-*.db")
    with Store.open(db, None, readonly=True) as store:
        stored = store.stats().tokens
    (repo / "json/new.py").write_text("def added():\n    return 1\n")  # not indexed: read in memory
    writer = start_writer(db, Path(model))
    try:
        capsys.readouterr()
        with caplog.at_level("WARNING"):
            rc = cli_main(["complete", f"{repo / 'json/new.py'}:2:5", "--repo", str(repo), "--model", model,
                           "--no-server", "--max-tokens", "2", "--json"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert f"PID {writer.pid}" in caplog.text and "read-only" in caplog.text, caplog.text
        done = json.loads(out)
        assert done["memory_tokens"] >= stored > 0  # every indexed file's memory
        assert cli_main(["ask", "What does added return?", "--repo", str(repo), "--model", model, "--no-server",
                         "--max-tokens", "2"]) == 0, capsys.readouterr().err
        assert writer.poll() is None  # still writing: nothing waited for it
    finally:
        writer.kill()
        writer.wait()
    with Store.open(db, None, readonly=True) as store:
        assert store.stats().files == 2 and store.file("json/new.py") is None  # the reader wrote nothing


def test_cli_plain_progress_lines_when_stderr_is_not_a_terminal(tiny, tmp_path):
    root = copy_packages(tmp_path / "repo", "email")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "longllama_lsp.cli", "index", str(root), "--model", str(tiny[2]),
                           "--chunk-tokens", str(CHUNK_TOKENS), "--first", str(root / "email/mime/text.py")],
                          capture_output=True, text=True, env=env, timeout=600, check=True)
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and not any("%|" in line for line in lines)  # no tqdm bars in a log
    assert lines[0] == "scanning: 1/" + lines[0].split("/")[1]
    assert any(line.startswith("ready: open files (1 of ") for line in lines)
    assert any(line.startswith("ready: their imports (") for line in lines)  # charset.py, nonmultipart.py: 19 kB
    encode = [line for line in lines if line.startswith("encoding: ")]
    assert encode and ", ETA " in encode[0] and "tokens/s" in encode[-1]
    assert "usable now: all " in done.stdout


def test_plain_progress_prints_one_line_per_period_and_every_phase_end(tiny, tmp_path, capsys):
    from indexer.commands import ProgressLines

    root = copy_packages(tmp_path / "repo", "json")
    now = [0.0]
    lines = ProgressLines(every_s=10.0, clock=lambda: now[0])
    events = []

    def progress(p):
        now[0] += 1.0  # one simulated second per event
        events.append(p.phase)
        lines(p)

    with open_ix(root, tiny) as ix:
        ix.index(progress=progress)
        chunks = ix.store.stats().chunks
    printed = capsys.readouterr().err.splitlines()
    assert events.count("encode") > chunks * 0.9  # a report per chunk, not per 64-chunk batch
    assert len(printed) <= 2 + len(events) / 10 + 2  # first line, one per 10 s, each phase's last line
    assert printed[0] == "scanning: 1/5 files"
    done, total = printed[-1].split(" chunks")[0].removeprefix("encoding: ").split("/")
    assert done == total and int(total) > chunks * 0.9  # the last line: all encoded (same text once)


@pytest.mark.parametrize("how", ["open", "open_checkpoint"])
def test_an_indexer_that_fails_to_open_releases_the_index(repo, tiny, monkeypatch, how):
    """A write that fails while the Indexer is built (a full disk) is the error it is, and the writer lock is
    released: opening again in the same process (a server retrying) works instead of 'being written by
    another process' (this process)."""
    from indexer.encoder import LazyEncoder
    from longllama_lsp.errors import StoreError

    model, tok, model_dir = tiny

    def opened():
        if how == "open":
            return open_ix(repo, tiny)
        return Indexer.open_checkpoint(repo, model_dir, LazyEncoder(model_dir, lambda: model), device=None,
                                       chunk_tokens=CHUNK_TOKENS)

    def full(*args):
        raise StoreError("database or disk is full")

    with monkeypatch.context() as m:
        m.setattr(Store, "set_meta", full)
        with pytest.raises(StoreError, match="full"):
            opened()
    with opened() as ix:
        assert not ix.store.readonly


# -- model mismatch ------------------------------------------------------------------------------

def test_index_of_another_model_refuses_to_open(tiny, smol_tokenizer_dir, tmp_path):  # noqa: F811
    from longllama_lsp.model.loading import load_model

    other_dir = write_tiny_model(tmp_path / "other", smol_tokenizer_dir, seed=1)
    other = (load_model(other_dir).eval(), tiny[1], other_dir)
    repo = small_repo(tmp_path / "repo")
    with open_ix(repo, tiny) as ix:
        ix.index()
    [db] = (repo / ".longllama").glob("index-*.db")
    with pytest.raises(StoreMismatch, match="was built by model"):
        open_ix(repo, other, db_path=db)
    with open_ix(repo, other) as ix:  # its default database is its own: no mixing, a separate index
        assert ix.store.path != db.absolute()
        assert ix.index().chunks_encoded > 0
    with open_ix(repo, tiny) as ix:  # the first model's index is untouched
        assert ix.index().chunks_encoded == 0
