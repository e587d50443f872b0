"""Repositories -> directory documents -> token streams -> FoT batches (spec §3.2 "Data").

Documents are repository-level, as in LongLLaMA's Python subset (paper Table 6): the files of one
directory concatenated in a seeded random order. Each document is tokenized as EasyLM's TextProcessor
does it, [bos] + tokens + [eos], and documents shorter than `min_doc_tokens` are dropped (reference
TokenFilter; they are not merged).

Packing is the reference `KPackingDAPipeline(k)` (FoT/data_pipeline.py): a document-aware pipeline
with B/k streams of k·T tokens, reshaped to (B, T). A stream keeps its document until it ends, then
takes the next document from the shared source, so with B=4, k=2 a batch looks like

    stream 0 = [bos d0 ... d0 eos bos d2 ... | ...          ]  -> rows 0, 1
    stream 1 = [bos d1 ...................... | ...          ]  -> rows 2, 3

and rows j·k … j·k+k−1 are k consecutive chunks of one stream (a "pack"). The next batch continues
every stream where it stopped. `crossbatch.visible_contexts` relies on exactly this layout.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from finetune.config import DataArgs, HFSource

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value skipped by the model's cross-entropy

# One tokenized document: (tokens, loss mask, name), the reference token_source tuple.
TokenDoc = tuple[list[int], list[float], str]


@dataclass(frozen=True)
class SourceFile:
    """A file kept for training: `path` is relative to `root` (posix), `sha256` of its bytes."""

    root: Path
    path: str
    sha256: str

    def read_text(self) -> str:
        return (self.root / self.path).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Document:
    """All kept files of one directory; `name` = "<root name>/<directory>"."""

    name: str
    files: tuple[SourceFile, ...]


# ---------------------------------------------------------------------------------------------
# Sources: local directories, globs, git URLs


def _walker():
    try:
        from indexer import walker
    except ImportError as e:  # indexer.walker owns ignore and secret rules; never train without them
        raise RuntimeError("finetune.data needs indexer.walker (walk, looks_like_secret)") from e
    return walker


def is_git_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "git@", "ssh://", "git://", "file://")) or (
        source.endswith(".git") and not Path(source).expanduser().is_dir()
    )


def clone_shallow(url: str, cache_dir: str | Path) -> Path | None:
    """`git clone --depth 1` into the cache (reused if present); None, with a warning, when it fails.

    No repository code runs: hooks are disabled, no templates, no submodules, LFS smudge skipped.
    """
    cache = Path(cache_dir).expanduser()
    name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git") or "repo"
    dest = cache / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    if (dest / ".git").exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    cmd = ["git", "-c", "core.hooksPath=/dev/null", "-c", "protocol.ext.allow=never", "clone", "--depth", "1",
           "--quiet", "--template=", "--", url, str(tmp)]
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        logger.warning("skipping %s: git clone failed (offline or unreachable?): %s", url, str(detail).strip())
        return None
    tmp.rename(dest)
    return dest


def resolve_sources(args: DataArgs) -> list[Path]:
    """Directories to walk, in config order; globs expand to their matching directories (sorted)."""
    roots: list[Path] = []
    for source in args.sources:
        if is_git_url(source):
            cloned = clone_shallow(source, args.git_cache_dir)
            roots += [cloned] if cloned else []
            continue
        pattern = os.path.expanduser(source)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        dirs = [Path(m) for m in matches if Path(m).is_dir()]
        if not dirs:
            logger.warning("source %s matches no directory; skipped", source)
        roots += dirs
    return roots


def collect_files(args: DataArgs, only: Collection[str] | None = None) -> list[SourceFile]:
    """Walked files passing the size, language, text and secret filters, deduplicated by content.

    `only`: relative paths to keep (the train side of `split_repo_files`), None = all.
    """
    walker = _walker()
    seen: set[str] = set()
    kept: list[SourceFile] = []
    for root in resolve_sources(args):
        for rel in sorted(PurePosixPath(*Path(f.path).parts).as_posix() for f in walker.walk(root)):
            if only is not None and rel not in only:
                continue
            text, data = _read_file(root / rel, args)
            if text is None or walker.looks_like_secret(text):
                continue
            digest = hashlib.sha256(data).hexdigest()
            if args.dedup and digest in seen:
                continue
            seen.add(digest)
            kept.append(SourceFile(root, rel, digest))
    return kept


def _read_file(path: Path, args: DataArgs) -> tuple[str | None, bytes]:
    if args.languages is not None and path.suffix not in args.languages:
        return None, b""
    try:
        if path.stat().st_size > args.max_file_bytes:
            return None, b""
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            return None, b""
        return data.decode("utf-8"), data
    except (OSError, UnicodeDecodeError):
        return None, b""


def group_documents(files: Iterable[SourceFile]) -> list[Document]:
    """One document per (root, directory), sorted by name; file order is decided per epoch."""
    groups: dict[tuple[Path, str], list[SourceFile]] = {}
    for f in files:
        groups.setdefault((f.root, str(PurePosixPath(f.path).parent)), []).append(f)
    docs = [Document(f"{root.name}/{d}", tuple(sorted(fs, key=lambda f: f.path)))
            for (root, d), fs in groups.items()]
    return sorted(docs, key=lambda d: d.name)


def document_text(doc: Document, rng: random.Random, file_header: str = "") -> str:
    """Files of `doc` in `rng` order, each ending with a newline, optionally after `file_header`."""
    files = list(doc.files)
    rng.shuffle(files)
    parts = []
    for f in files:
        text = f.read_text()
        parts.append(file_header.format(path=f.path) + (text if text.endswith("\n") else text + "\n"))
    return "".join(parts)


def is_code(path: str) -> bool:
    """A file in one of the indexer's grammar languages (not prose, config or data)."""
    from indexer.languages import SPECS, language_for

    return language_for(path) in SPECS


def split_repo_files(root: str | Path, heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) relative paths of a repository, split per file by a seeded hash.

    A file's side depends only on (seed, path), so adding files never moves others. Only source code
    is held out when the repository has >= 2 code files (a grammar's language): the held-out files
    judge a model of code, and a LICENSE or changelog judged it badly. If the hash puts no file on the
    held-out side, the lowest-hash candidate goes there.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    paths = sorted(PurePosixPath(*Path(f.path).parts).as_posix() for f in _walker().walk(Path(root)))
    code = [p for p in paths if is_code(p)]
    candidates = code if len(code) >= 2 else paths

    def u(p: str) -> float:
        return int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:16], 16) / 2**64

    heldout = [p for p in candidates if u(p) < heldout_fraction]
    if not heldout and heldout_fraction > 0 and len(paths) >= 2:
        heldout = [min(candidates, key=u)]
    held = set(heldout)
    return [p for p in paths if p not in held], heldout


# ---------------------------------------------------------------------------------------------
# Tokens


def document_ends(tokenizer: Any) -> tuple[int, int]:
    """(first id, last id) of every document: bos and eos.

    A tokenizer without BOS (Qwen2 / Qwen2.5-Coder: documents were separated by <|endoftext|> in
    pretraining) starts each document with its EOS instead.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: training needs it to end documents")
    return (eos if bos is None else bos), eos


def encode_document(tokenizer: Any, text: str) -> tuple[list[int], list[float]]:
    """[bos] + tokens + [eos] (document_ends) with the TextProcessor loss mask (0 on bos, 1 elsewhere)."""
    bos, eos = document_ends(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = list(getattr(ids, "ids", ids))  # a raw `tokenizers.Tokenizer` returns an Encoding
    return [bos, *ids, eos], [0.0] + [1.0] * (len(ids) + 1)


def local_documents(docs: list[Document], tokenizer: Any, args: DataArgs) -> Iterator[TokenDoc]:
    """Endless token documents: each epoch reshuffles document order and file order (seeded)."""
    epoch = 0
    while True:
        order = list(range(len(docs)))
        random.Random(f"{args.seed}:{epoch}").shuffle(order)
        produced = 0
        for i in order:
            rng = random.Random(f"{args.seed}:{epoch}:{docs[i].name}")
            tokens, mask = encode_document(tokenizer, document_text(docs[i], rng, args.file_header))
            if len(tokens) >= args.min_doc_tokens:
                produced += 1
                yield tokens, mask, docs[i].name
        if not produced:
            raise ValueError(f"no document has >= {args.min_doc_tokens} tokens ({len(docs)} documents); "
                             "lower min_doc_tokens or add sources")
        epoch += 1


def hf_documents(source: HFSource, tokenizer: Any, args: DataArgs, looks_like_secret: Callable[[str], bool]
                 ) -> Iterator[TokenDoc]:
    """Endless token documents streamed from a Hugging Face dataset, one example per document."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"hf_datasets source {source.path!r} needs `pip install datasets`") from e
    epoch = 0
    while True:
        stream = datasets.load_dataset(source.path, source.name, split=source.split, streaming=True)
        stream = stream.shuffle(seed=args.seed + epoch, buffer_size=10_000)
        for i, example in enumerate(stream):
            text = example[source.text_field]
            if len(text.encode()) > args.max_file_bytes or looks_like_secret(text):
                continue
            tokens, mask = encode_document(tokenizer, text)
            if len(tokens) >= args.min_doc_tokens:
                yield tokens, mask, f"{source.path}#{epoch}:{i}"
        epoch += 1


def round_robin(streams: list[Iterator[TokenDoc]]) -> Iterator[TokenDoc]:
    while True:
        for s in streams:
            yield next(s)


# ---------------------------------------------------------------------------------------------
# Packing (FoT/data_pipeline.py DocAwareDataPipeline + KPackingDAPipeline)


def doc_aware_batches(source: Iterable[TokenDoc], batch_size: int, seq_len: int) -> Iterator[dict[str, Any]]:
    """Reference DocAwareDataPipeline: each row bound to a stream of whole documents.

    Rows are refilled in order 0..B−1, each taking documents until it holds seq_len+1 tokens (the
    +1 is the next-token target of the last input). Yields lists of rows: input/target ids, target
    loss mask, input loss mask, document ids (a running count of documents taken) and their names.
    """
    src = iter(source)
    rows: list[tuple[list[int], list[float], list[int]]] = [([], [], []) for _ in range(batch_size)]
    names: dict[int, str] = {}  # documents still in some row
    taken = 0
    while True:
        for tokens, mask, ids in rows:
            while len(tokens) < seq_len + 1:
                doc_tokens, doc_mask, name = next(src)
                assert len(doc_tokens) == len(doc_mask)
                tokens += doc_tokens
                mask += doc_mask
                ids += [taken] * len(doc_tokens)
                names[taken] = name
                taken += 1
        out: dict[str, Any] = {"input_ids": [], "target_ids": [], "loss_mask": [], "input_mask": [],
                               "doc_ids": []}
        for i, (tokens, mask, ids) in enumerate(rows):
            out["input_ids"].append(tokens[:seq_len])
            out["target_ids"].append(tokens[1:seq_len + 1])
            out["loss_mask"].append(mask[1:seq_len + 1])
            out["input_mask"].append(mask[:seq_len])
            out["doc_ids"].append(ids[:seq_len])
            rows[i] = (tokens[seq_len:], mask[seq_len:], ids[seq_len:])
        out["doc_names"] = {d: names[d] for d in sorted({d for r in out["doc_ids"] for d in r})}
        left = {d for _, _, ids in rows for d in ids}
        names = {d: n for d, n in names.items() if d in left}
        yield out


def k_packing_batches(source: Iterable[TokenDoc], batch_size: int, seq_len: int, pack: int
                      ) -> Iterator[dict[str, Any]]:
    """Reference KPackingDAPipeline: B/k streams of k·T tokens reshaped to (B, T) tensors.

    Yields input_ids, labels, target_ids, loss_mask, doc_ids (all (B, T)) and doc_names {id: name}.
    labels = input_ids with IGNORE_INDEX where the input is a document's <bos>, so a model that shifts
    labels inside the row computes exactly the reference loss (TextProcessor gives bos mask 0), except
    for the last position of each row, whose target (target_ids[:, -1], the next row's first token)
    only the reference-style (target_ids, loss_mask) pair carries.
    """
    if batch_size % pack != 0:
        raise ValueError(f"batch_size {batch_size} is not divisible by pack {pack}")
    for inner in doc_aware_batches(source, batch_size // pack, pack * seq_len):
        grid = {key: torch.tensor(inner[key]).reshape(batch_size, seq_len)  # (B/k, k·T) -> (B, T)
                for key in ("input_ids", "target_ids", "loss_mask", "input_mask", "doc_ids")}
        yield {
            "input_ids": grid["input_ids"],
            "labels": grid["input_ids"].masked_fill(grid["input_mask"] == 0, IGNORE_INDEX),
            "target_ids": grid["target_ids"],
            "loss_mask": grid["loss_mask"],
            "doc_ids": grid["doc_ids"],
            "doc_names": inner["doc_names"],
        }


def fot_batches(args: DataArgs, tokenizer: Any, only: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """Endless FoT training batches from `args.sources` (+ `args.hf_datasets`); same seed, same batches."""
    streams: list[Iterator[TokenDoc]] = []
    if args.sources:
        docs = group_documents(collect_files(args, only))
        if not docs:
            raise ValueError(f"no usable files in sources {args.sources}")
        logger.info("%d directory documents from %d sources", len(docs), len(args.sources))
        streams.append(local_documents(docs, tokenizer, args))
    for hf in args.hf_datasets:
        streams.append(hf_documents(hf, tokenizer, args, _walker().looks_like_secret))
    if not streams:
        raise ValueError("DataArgs has neither sources nor hf_datasets")
    return k_packing_batches(round_robin(streams), args.batch_size, args.seq_len, args.pack)
