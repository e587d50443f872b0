"""Training data that teaches the memory layers to retrieve (issue 16), generated from local code.

Every example is (memory chunks, target window): the chunks are encoded independently into memory,
exactly as the indexer does at inference (`model.encode_memory`: keys at position 0, an unordered
bag), and the target window is scored with that memory. Three kinds:

    repo       a real file of a local package; memory = chunks of the files it imports (the
               definitions it uses, chunks holding the names the window uses first), filled with
               other files of its package. Loss on every target token; cross-file identifier
               tokens (finetune.pycode) are flagged and weighted `xid_weight`; tokens only memory
               can supply by copying (`copy_weights`) are weighted `copy_weight`.
    synthetic  a made-up constant, function signature, dict entry or class defined in one memory
               chunk among look-alike decoys (inserted into real code); the local context ends
               with a use whose continuation needs the definition. Loss on the answer only (plus
               `context_weight` on the real code before it).
    passkey    the passkey prompt of finetune/passkey.py: memory = the chunk holding the key plus
               filler chunks; the target ends with the question and the key. Loss on the key.

What precedes a question varies (`passkey_prompts`, `synthetic_ask`): a model that only ever saw the
question after filler reads the key there and nowhere else (`longllama ask "What is the pass key?"`
answered a made-up key while the reference prompt read it). Prompt styles, answer weighted only:
    reference  filler (sometimes the task sentence) up to the question, the window's end (above)
    ask        `longllama ask`'s chat prompt (engine.ask_prompt_ids) at the window's start; the answer
               is a sentence and the end-of-turn token; the padding after it changes nothing (causal)
    bare       the question line alone at the window's start (a new file)
    code       real code up to the question line

Besides its own chunks (differentiable), every row sees a shared pool of distractor chunks:
code of other packages and passkey filler (`Pool`, re-encoded without gradient every few steps).

Local code only: packages of the given roots (default: this interpreter's site-packages and the
standard library). Held-out repositories (requests, flask, click by default) are excluded at any
depth, vendored copies included (pip/_vendor/requests).
"""

from __future__ import annotations

import random
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from finetune.data import document_ends
from finetune.passkey import ASK_QUESTION, FILLER, QUESTION, TASK
from finetune.pycode import (
    PyFacts,
    analyse,
    crossfile_names,
    exports,
    module_name,
    resolve_imports,
    token_flags,
)
from indexer.encoder import context_before

HELD_OUT = ("requests", "flask", "click")  # evaluation repositories (finetune/skill_eval.py)
KINDS = ("repo", "synthetic", "passkey")
PASSKEY_PROMPTS = ("reference", "ask", "bare", "code")
ASK_PASSKEY = (ASK_QUESTION, "What's the pass key?", "Which pass key is mentioned?",
               "Tell me the pass key.", "what is the pass key")
SKIP_DIRS = {"__pycache__", ".git", "node_modules"}


def default_roots() -> list[str]:
    """This interpreter's site-packages (purelib) and the standard library."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["stdlib"], *map(str, sorted(Path("/usr/lib").glob("python3.*")))]))


def is_held_out(rel_parts: Sequence[str], held_out: Sequence[str]) -> bool:
    """True when any path component is (or is the dist-info of) a held-out repository."""
    for part in rel_parts:
        base = part.lower().removesuffix(".py")
        if any(base == h or base.startswith(f"{h}-") or base.startswith(f"{h}_") for h in held_out):
            return True
    return False


@dataclass
class Package:
    name: str
    root: Path  # the directory holding the package directory
    files: list[str]  # posix paths relative to root, e.g. "email/mime/text.py"


def find_packages(roots: Sequence[str | Path], held_out: Sequence[str] = HELD_OUT, max_files: int = 400,
                  max_bytes: int = 200_000, seed: int = 0) -> list[Package]:
    """Top-level packages (directories with `__init__.py`) of `roots` with >= 2 Python files.

    Files over `max_bytes`, symlinks and held-out paths are skipped; big packages keep a seeded
    sample of `max_files` files.
    """
    out: list[Package] = []
    seen: set[str] = set()  # a package name found under two roots (two stdlib copies) counts once
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for pkg in sorted(root.iterdir()):
            if (not pkg.is_dir() or pkg.is_symlink() or pkg.name in SKIP_DIRS or "." in pkg.name
                    or not (pkg / "__init__.py").is_file() or is_held_out([pkg.name], held_out)
                    or pkg.name in seen):
                continue
            seen.add(pkg.name)
            files = []
            for p in sorted(pkg.rglob("*.py")):
                rel = p.relative_to(root)
                if (p.is_symlink() or SKIP_DIRS & set(rel.parts) or is_held_out(rel.parts, held_out)
                        or not p.is_file()):
                    continue
                try:
                    if p.stat().st_size > max_bytes:
                        continue
                except OSError:
                    continue
                files.append(rel.as_posix())
            if len(files) >= 2:
                if len(files) > max_files:
                    files = sorted(random.Random(f"{seed}:{pkg.name}").sample(files, max_files))
                out.append(Package(pkg.name, root, files))
    return out


@dataclass
class FileInfo:
    text: str
    ids: list[int]  # [bos] + tokens + [eos] (finetune.data.document_ends)
    offsets: list[tuple[int, int]]  # character span of each id ((0, 0) for bos/eos)
    facts: PyFacts  # finetune.pycode.analyse of `text`
    imports: list[str]  # repository paths it imports (facts.imports resolved)


class Corpus:
    """Lazily read, analysed and tokenized files of `packages` (a bounded cache of FileInfo)."""

    def __init__(self, packages: list[Package], tokenizer: Any, cache_files: int = 4000):
        if not packages:
            raise ValueError("no training packages found (check the roots and held-out names)")
        self.packages, self.tokenizer = packages, tokenizer
        self._info: dict[tuple[str, str], FileInfo | None] = {}
        self._modules = {p.name: {module_name(f): f for f in p.files} for p in packages}
        self._pkg_exports: dict[str, dict[str, set[str]]] = {}
        self.cache_files = cache_files

    def info(self, pkg: Package, path: str) -> FileInfo | None:
        key = (pkg.name, path)
        if key not in self._info:
            if len(self._info) >= self.cache_files:
                self._info.pop(next(iter(self._info)))
            self._info[key] = self._load(pkg, path)
        return self._info[key]

    def _load(self, pkg: Package, path: str) -> FileInfo | None:
        try:
            text = (pkg.root / path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        if not text.strip() or "\0" in text:
            return None
        from indexer.walker import looks_like_secret

        if looks_like_secret(text):
            return None
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        bos, eos = document_ends(self.tokenizer)
        facts = analyse(text)
        return FileInfo(text, [bos, *enc["input_ids"], eos], [(0, 0), *enc["offset_mapping"], (0, 0)],
                        facts, resolve_imports(path, facts.imports, self._modules[pkg.name]))

    def exports_of(self, pkg: Package) -> dict[str, set[str]]:
        """{path: exported names} of every readable file of the package (cached)."""
        if pkg.name not in self._pkg_exports:  # tree-sitter only: tokenizing every file would be slow
            out = {}
            for f in pkg.files:
                known = self._info.get((pkg.name, f))
                if known is not None:
                    out[f] = known.facts.exports
                    continue
                try:
                    out[f] = exports((pkg.root / f).read_bytes())
                except OSError:
                    continue
            self._pkg_exports[pkg.name] = out
        return self._pkg_exports[pkg.name]


@dataclass
class Example:
    kind: str
    memory: list[list[int]]  # chunks of <= chunk_len ids, encoded independently
    ids: list[int]  # target_len + 1 ids: inputs ids[:-1], next-token targets ids[1:]
    weights: list[float]  # target_len loss weights
    flags: list[bool]  # target_len: target is a cross-file identifier / the answer
    meta: dict[str, Any] = field(default_factory=dict)
    # the ids before each memory chunk in its file (MixArgs.memory_context), encoded before it and
    # dropped, as the index encodes a chunk after the text before it; none: each chunk alone
    contexts: list[list[int]] = field(default_factory=list)


@dataclass
class MixArgs:
    """The `[retrieval]` table of a training TOML: sources, mix, shapes, weights."""

    roots: list[str] = field(default_factory=default_roots)
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT))
    mix: dict[str, float] = field(default_factory=lambda: {"repo": 0.4, "synthetic": 0.3, "passkey": 0.3})
    chunk_len: int = 256  # tokens per memory chunk
    target_len: int = 256  # tokens of the scored local window
    own_chunks: int = 4  # differentiable memory chunks per example
    # Tokens of its file before each memory chunk that it is encoded after (the index encodes a chunk
    # after up to indexer.schema.CONTEXT_CHARS characters before it; the eval's --memory-context is
    # 256 tokens). 0: each chunk alone (the data stream of earlier recipes, byte for byte).
    memory_context: int = 0
    # Or characters, cut as the index cuts them (indexer.encoder.context_before: from a line start, the
    # text tokenized alone), for repository chunks only: synthetic, passkey and pool chunks stay alone,
    # as no index holds them (their data stream is memory_context=0's). One of the two may be set.
    memory_context_chars: int = 0
    # Look-alike distractors: repo examples also get this many chunks of the package's files that the
    # target does not import and that define none of its names. The server's selection fills memory with
    # the same repository's code; other packages' code and filler (the pool) are easier to ignore.
    same_repo_chunks: int = 0
    pool_code_chunks: int = 16  # shared distractor chunks of other packages
    pool_filler_chunks: int = 8  # distinct passkey filler chunks in the pool
    pool_filler_repeat: int = 4  # each filler chunk counted this many times (duplicates cost no encoding)
    pool_refresh: int = 10  # steps between re-encodings of the pool
    # What precedes the question (module docstring): style -> weight. {"reference": 1} keeps the stream
    # of earlier recipes byte for byte (no draw is made).
    passkey_prompts: dict[str, float] = field(default_factory=lambda: {"reference": 1.0})
    synthetic_ask: float = 0.0  # share of synthetic constants / dict entries asked through ask's prompt
    xid_weight: float = 3.0  # loss weight of cross-file identifier tokens in repo examples
    # Loss weight of each cross-file identifier's first token (a flagged token after an unflagged one):
    # the token a completion at the start of a name must choose, and the one memory barely helps with
    # (skill eval: first token -2.5%, the rest -47%). 0: xid_weight, as every earlier recipe (the data
    # stream is the same either way; only the weights differ).
    xid_first_weight: float = 0.0
    # xid_first_weight only on names a memory chunk of the example defines (the others' first tokens keep
    # xid_weight): what memory can supply, not what only the prior can learn (CPU run 17 taught the prior).
    xid_first_held_only: bool = False
    # Loss weight of repo target tokens that end a `copy_ngram`-token run found in the example's memory
    # chunks and not earlier in its window: what a completion can only copy from another file (a line
    # BM25 snippets paste verbatim). 1.0: off (the data stream is unchanged).
    copy_weight: float = 1.0
    copy_ngram: int = 4
    context_weight: float = 0.1  # loss weight of the real code before a synthetic answer
    # The guard term: the memory layers' q/k/v/o also serve local attention, so each step also scores
    # `lm_rows` plain windows of `lm_len` tokens of training code WITHOUT memory and adds their mean
    # NLL x `lm_weight` (without it, 40 steps moved held-out perplexity without memory +2.4%).
    lm_rows: int = 0
    lm_len: int = 256
    lm_weight: float = 1.0
    max_files_per_package: int = 400
    seed: int = 0

    def __post_init__(self):
        bad = sorted(set(self.mix) - set(KINDS))
        if bad or not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise ValueError(f"retrieval.mix needs non-negative weights of {KINDS}, got {self.mix}")
        if self.own_chunks < 1 or self.same_repo_chunks < 0 or self.chunk_len < 16 or self.target_len < 32 \
                or min(self.memory_context, self.memory_context_chars, self.xid_first_weight) < 0:
            raise ValueError("retrieval: own_chunks >= 1, same_repo_chunks >= 0, chunk_len >= 16, target_len "
                             ">= 32 and memory_context, memory_context_chars, xid_first_weight >= 0 required")
        if self.memory_context and self.memory_context_chars:
            raise ValueError("retrieval: set memory_context (tokens) or memory_context_chars, not both")
        bad = sorted(set(self.passkey_prompts) - set(PASSKEY_PROMPTS))
        if bad or min(self.passkey_prompts.values(), default=-1) < 0 or sum(self.passkey_prompts.values()) <= 0:
            raise ValueError(f"retrieval.passkey_prompts needs non-negative weights of {PASSKEY_PROMPTS}, "
                             f"got {self.passkey_prompts}")
        if not 0 <= self.synthetic_ask <= 1:
            raise ValueError(f"retrieval.synthetic_ask is a share in [0, 1], got {self.synthetic_ask}")
        if self.copy_weight < 0 or self.copy_ngram < 2:
            raise ValueError("retrieval: copy_weight >= 0 and copy_ngram >= 2 required")
        if self.lm_rows < 0 or self.lm_len < 2 or self.lm_weight < 0:
            raise ValueError("retrieval: lm_rows >= 0, lm_len >= 2 and lm_weight >= 0 required")


# ---------------------------------------------------------------------------------------------
# Helpers


def _chunks(ids: list[int], n: int) -> list[list[int]]:
    return [ids[i:i + n] for i in range(0, len(ids), n)]


def xid_weights(flags: list[bool], weight: float, first_weight: float, first_ok: list[bool] | None = None
                ) -> list[float]:
    """Loss weights of the targets flags[1:] (flags[0]: the token before the first target): `weight` on
    cross-file identifier tokens, `first_weight` (when set) on a name's first token (only where `first_ok`,
    aligned with flags, says so, when given), 1.0 elsewhere."""
    first = first_weight or weight
    ok = first_ok[1:] if first_ok is not None else [True] * (len(flags) - 1)
    return [(first if not prev and k else weight) if f else 1.0
            for (prev, f), k in zip(pairwise(flags), ok, strict=True)]


def copy_weights(ids: list[int], memory: list[list[int]], weights: list[float], n: int, weight: float
                 ) -> list[float]:
    """`weights` (one per target ids[1:]) with target j raised to `weight` where the n ids ending at it,
    ids[j+2-n : j+2], occur in a memory chunk and nowhere earlier in ids: a token memory alone can supply."""
    in_memory = {tuple(c[i:i + n]) for c in memory for i in range(len(c) - n + 1)}
    seen: set[tuple[int, ...]] = set()
    out = list(weights)
    for j in range(n - 2, len(ids) - 1):
        gram = tuple(ids[j + 2 - n:j + 2])
        if gram in in_memory and gram not in seen:
            out[j] = max(out[j], weight)
        seen.add(gram)
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


WORDS = ("alpha amber anchor arch atlas badge basin beacon birch blade bloom bolt cedar chalk cipher "
         "cobalt comet coral crane crest delta drift ember falcon fern flint forge frost garnet glade "
         "granite harbor hazel helix heron indigo iris jasper kelp lantern larch ledger lumen maple "
         "marble meadow mesa nectar nimbus oak onyx orbit otter pebble pine plume prism quartz quill "
         "raven reef ridge rune sable saffron sage shard sierra slate sorrel spruce summit tango "
         "thistle timber topaz tundra umber vale vapor vertex willow yarrow zephyr zinc").split()
VERBS = "build fetch load parse render resolve scan sync merge split encode decode verify compute".split()
PARAMS = "path name key value timeout retries strict limit mode source target count flags encoding".split()


def _asked_name(kind: str, definition: str, use: str) -> str | None:
    """What an `ask` question names for a constant (NAME) or dict entry (NAME['key']); None otherwise."""
    if kind == "const":
        return definition.split(" = ")[0]
    if kind == "dict":
        return use.removeprefix("assert ").removesuffix(" == ")
    return None


def _snake(rng: random.Random, n: int) -> str:
    return "_".join(rng.sample(WORDS, n))


def _camel(rng: random.Random, n: int) -> str:
    return "".join(w.capitalize() for w in rng.sample(WORDS, n))


# ---------------------------------------------------------------------------------------------
# Generators


class ExampleMaker:
    """Seeded, endless examples of every kind (see the module docstring)."""

    def __init__(self, corpus: Corpus, args: MixArgs):
        self.corpus, self.args, self.tok = corpus, args, corpus.tokenizer
        # filler for memory chunks (chunk_len), their contexts and the passkey's local window (target_len + 1)
        longest = max(args.chunk_len, args.target_len + 1, args.memory_context)
        self.filler_ids = _encode(self.tok, " ".join([FILLER] * (8 * longest // 20 + 8)))
        self._targets: list[tuple[Package, str]] | None = None

    # -- repo --------------------------------------------------------------------------------

    def _target_files(self) -> list[tuple[Package, str]]:
        """Every (package, file), the candidates for a target (fixed order: a fresh maker, e.g. after a
        resume or in a data worker, makes the same examples from the same seed)."""
        if self._targets is None:
            self._targets = [(p, f) for p in self.corpus.packages for f in p.files]
        return self._targets

    def repo(self, rng: random.Random) -> Example | None:
        a = self.args
        cands = self._target_files()
        for _ in range(50):
            pkg, path = cands[rng.randrange(len(cands))]
            info = self.corpus.info(pkg, path)
            if info is None or not info.imports or len(info.ids) < a.target_len + 1:
                continue
            exports = self.corpus.exports_of(pkg)
            others = set().union(*(e for f, e in exports.items() if f != path)) if len(exports) > 1 else set()
            names = crossfile_names(info.facts, others)
            spans = [(s, e) for s, e, n in info.facts.identifiers if n in names]
            flags = token_flags(info.text, info.offsets, spans)
            hits = [i for i, f in enumerate(flags) if f and i >= 1]
            if not hits:
                continue
            end = min(len(info.ids), rng.choice(hits) + 1 + rng.randrange(a.target_len // 4))
            start = max(0, end - a.target_len - 1)
            ids = info.ids[start:start + a.target_len + 1]
            tflags = flags[start + 1:start + a.target_len + 1]
            lo, hi = info.offsets[start + 1][0], info.offsets[start + len(ids) - 1][1]
            window_names = {n for s, e, n in info.facts.identifiers if n in names and lo <= s < hi}
            memory, contexts, held = self._repo_memory(pkg, path, info, window_names, rng)
            first_ok = None  # which names' first tokens get xid_first_weight (None: every name's)
            if a.xid_first_held_only:
                first_ok = token_flags(info.text, info.offsets, [(s, e) for s, e, n in info.facts.identifiers
                                                                 if n in held])[start:start + a.target_len + 1]
            w = xid_weights(flags[start:start + a.target_len + 1], a.xid_weight, a.xid_first_weight, first_ok)
            if a.copy_weight != 1.0:
                w = copy_weights(ids, memory, w, a.copy_ngram, a.copy_weight)
            return Example("repo", memory, ids, w, tflags, {"path": f"{pkg.name}:{path}"}, contexts)
        return None

    def _repo_memory(self, pkg: Package, path: str, info: FileInfo, names: set[str], rng: random.Random
                     ) -> tuple[list[list[int]], list[list[int]], set[str]]:
        """(chunks, their contexts, the `names` they define): own_chunks chunks of the imported files, those
        defining `names` first (then other files of the package if the imports are short); then
        same_repo_chunks look-alikes from the package's other files. A chunk's context: what comes before it
        in its file (_repo_context)."""
        a = self.args
        ranked: list[tuple[int, float, list[int], FileInfo, int, set[str]]] = []
        others = [f for f in pkg.files if f != path and f not in info.imports]
        for rank, files in ((0, info.imports), (1, rng.sample(others, min(len(others), 4)))):
            for f in files:
                fi = self.corpus.info(pkg, f)
                if fi is None:
                    continue
                for c in _chunks(list(range(len(fi.ids))), a.chunk_len):
                    lo, hi = fi.offsets[c[0]][0], max(fi.offsets[c[-1]][1], fi.offsets[c[0]][0])
                    text = fi.text[lo:hi]
                    defines = {n for n in names if f"def {n}" in text or f"class {n}" in text
                               or f"\n{n} =" in text or f"\n    {n} =" in text}
                    ranked.append((rank - (2 if defines else 0), rng.random(), fi.ids[c[0]:c[-1] + 1], fi, c[0],
                                   defines))
        ranked.sort(key=lambda r: (r[0], r[1]))
        # rank 1: a non-imported file's chunk that defines none of the names
        chosen = ranked[: a.own_chunks] + [r for r in ranked[a.own_chunks:] if r[0] == 1][: a.same_repo_chunks]
        return ([r[2] for r in chosen], [self._repo_context(r[3], r[4]) for r in chosen],
                set().union(*(r[5] for r in chosen)))

    def _repo_context(self, fi: FileInfo, start: int) -> list[int]:
        """The context of the chunk at fi.ids[start:]: the memory_context ids before it, or (with
        memory_context_chars) the text before it cut as the index cuts it and tokenized alone, as the
        index tokenizes a context. [] when both are 0."""
        a = self.args
        if not a.memory_context_chars:
            return fi.ids[max(0, start - a.memory_context):start]
        context = context_before(fi.text[:fi.offsets[start][0]], a.memory_context_chars)
        return _encode(self.tok, context) if context else []

    # -- synthetic ----------------------------------------------------------------------------

    def _code_ids(self, rng: random.Random, n: int) -> list[int]:
        """n consecutive ids of a random corpus file (fewer if no file is that long in 20 tries)."""
        best: list[int] = []
        for _ in range(20):
            pkg = rng.choice(self.corpus.packages)
            info = self.corpus.info(pkg, rng.choice(pkg.files))
            if info is None:
                continue
            ids = info.ids[1:-1]
            if len(ids) >= n:
                s = rng.randrange(len(ids) - n + 1)
                return ids[s:s + n]
            best = max(best, ids, key=len)
        return best

    def _definition(self, rng: random.Random, kind: str) -> tuple[str, str, str]:
        """(definition source, use prefix, answer) of one made-up name."""
        if kind == "const":
            name = _snake(rng, 3).upper()
            value = str(rng.randint(100, 999999))
            use = rng.choice([f"assert {name} == ", f"self.assertEqual({name}, ", f"# {name} defaults to "])
            return f"{name} = {value}\n", use, value
        if kind == "signature":
            name = f"{rng.choice(VERBS)}_{_snake(rng, 2)}"
            params = rng.sample(PARAMS, rng.randint(2, 4))
            sig = ", ".join(p if i == 0 else f"{p}={rng.randint(0, 99)}" for i, p in enumerate(params))
            body = f"def {name}({sig}):\n    return _{name}({', '.join(params)})\n"
            return body, f"result = {name}(", ", ".join(f"{p}={p}" for p in params) + ")"
        if kind == "dict":
            name = _snake(rng, 2).upper()
            keys = rng.sample(WORDS, 4)
            vals = [rng.randint(10, 9999) for _ in keys]
            src = f"{name} = {{{', '.join(f'{k!r}: {v}' for k, v in zip(keys, vals, strict=True))}}}\n"
            i = rng.randrange(len(keys))
            return src, f"assert {name}[{keys[i]!r}] == ", str(vals[i])
        module = _snake(rng, 2)
        cls = _camel(rng, 2)
        return (f"class {cls}:\n    \"\"\"{module.replace('_', ' ')} registry.\"\"\"\n",
                f"from .{module} import ", cls)

    def synthetic(self, rng: random.Random) -> Example:
        """One definition among decoys of the same kind in memory; the window ends with its use."""
        a = self.args
        kind = rng.choice(("const", "signature", "dict", "class"))
        memory, contexts = [], []
        target_src = None
        slot = rng.randrange(a.own_chunks)
        for i in range(a.own_chunks):
            src, use, answer = self._definition(rng, kind)
            if i == slot:
                target_src, target_use, target_answer = src, use, answer
            if kind == "class":  # the module name is what the use names: say it in the chunk
                src = f"# {use.split()[1].lstrip('.')}.py\n" + src
            context, chunk = self._insert(rng, _encode(self.tok, src), a.chunk_len)
            memory.append(chunk)
            contexts.append(context)
        assert target_src is not None
        meta = {"kind": kind, "answer": target_answer, "definition": target_src, "prompt": "code"}
        asked = _asked_name(kind, target_src, target_use)
        if asked is not None and a.synthetic_ask > 0 and rng.random() < a.synthetic_ask:
            question = rng.choice(("What is {}?", "What is the value of {}?", "what's {} set to"))
            ids, weights, flags = self._at_start(self._ask_ids(question.format(asked)),
                                                 self._ask_answer(f"{asked} is {target_answer}."))
            return Example("synthetic", memory, ids, weights, flags, {**meta, "prompt": "ask"}, contexts)
        use_ids, ans_ids = _encode(self.tok, "\n" + target_use), _encode(self.tok, target_answer + "\n")
        code = self._code_ids(rng, a.target_len + 1 - len(use_ids) - len(ans_ids))
        ids, weights, flags = self._at_end(code, use_ids, ans_ids, a.context_weight)
        return Example("synthetic", memory, ids, weights, flags, meta, contexts)

    def _insert(self, rng: random.Random, definition: list[int], n: int) -> tuple[list[int], list[int]]:
        """(context, chunk): a chunk of n ids of real code with `definition` at a random line start (by
        newline ids), after the memory_context ids of code before it."""
        context, host = self._code_run(rng, n)
        room = max(0, n - len(definition))
        host = host[:room]
        nl = [i for i, t in enumerate(host) if "\n" in self.tok.decode([t])]
        at = rng.choice(nl) + 1 if nl else 0
        return context, (host[:at] + definition + host[at:])[:n]

    def _code_run(self, rng: random.Random, n: int) -> tuple[list[int], list[int]]:
        """(context, ids): n consecutive ids of a corpus file after the memory_context ids before them
        (the context shrinks first when no file is that long)."""
        run = self._code_ids(rng, n + self.args.memory_context)
        cut = max(0, len(run) - n)
        return run[:cut], run[cut:]

    # -- passkey ------------------------------------------------------------------------------

    def filler_chunk(self, rng: random.Random) -> list[int]:
        return self._filler(rng, self.args.chunk_len)

    def _filler_context(self, rng: random.Random) -> list[int]:
        """memory_context ids of filler (none, and no draw, when memory_context is 0)."""
        return self._filler(rng, self.args.memory_context) if self.args.memory_context else []

    def _filler(self, rng: random.Random, n: int) -> list[int]:
        s = rng.randrange(len(self.filler_ids) - n)
        return self.filler_ids[s:s + n]

    def passkey(self, rng: random.Random) -> Example:
        """The key sentence in one memory chunk among filler; the question in one of the prompt styles."""
        a = self.args
        styles = list(a.passkey_prompts)
        style = styles[0] if len(styles) == 1 else rng.choices(styles, [a.passkey_prompts[k] for k in styles])[0]
        key = str(rng.randint(1, 50000))
        info = _encode(self.tok, f" The pass key is {key}. Remember it. {key} is the pass key.")
        # the reference prompt's first chunk starts with the task sentence; a user's files do not
        head = _encode(self.tok, TASK + "\n") if style == "reference" and rng.random() < 0.25 else []
        if len(head) + len(info) > a.chunk_len:
            head = []
        before = rng.randrange(max(1, a.chunk_len - len(head) - len(info)))
        key_chunk = (head + self.filler_chunk(rng)[:before] + info + self.filler_chunk(rng))[: a.chunk_len]
        memory = [key_chunk] + [self.filler_chunk(rng) for _ in range(a.own_chunks - 1)]
        rng.shuffle(memory)
        # filler before each chunk; the task sentence starts a file (nothing before it)
        contexts = [[] if head and c[:len(head)] == head else self._filler_context(rng) for c in memory]
        if style == "ask":
            ids, weights, flags = self._at_start(self._ask_ids(rng.choice(ASK_PASSKEY)),
                                                 self._ask_answer(f"The pass key is {key}."))
        elif style == "bare":
            ids, weights, flags = self._at_start(_encode(self.tok, QUESTION), _encode(self.tok, f" {key}."))
        else:  # filler (reference) or real code up to the question (target_len + 1 ids, whatever chunk_len is)
            before_ids = self._filler(rng, a.target_len + 1) if style == "reference" else \
                self._code_ids(rng, a.target_len + 1)
            ids, weights, flags = self._at_end(before_ids, _encode(self.tok, "\n" + QUESTION),
                                               _encode(self.tok, f" {key}."), 0.0)
        return Example("passkey", memory, ids, weights, flags, {"key": key, "prompt": style}, contexts)

    def _at_end(self, before: list[int], question: list[int], answer: list[int], before_weight: float
                ) -> tuple[list[int], list[float], list[bool]]:
        """(ids, weights, flags): the window ends with question + answer, `before` fills the rest (its
        start cut off; padded in front with weight 0 when too short)."""
        n = self.args.target_len
        ids = (before + question + answer)[-(n + 1):]
        n_ans = min(len(answer), n)
        flags = [False] * (n - n_ans) + [True] * n_ans
        weights = [1.0 if f else before_weight for f in flags]
        if len(ids) < n + 1:
            ids = [self.tok.eos_token_id] * (n + 1 - len(ids)) + ids
        return ids, weights, flags

    def _at_start(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[float], list[bool]]:
        """(ids, weights, flags): a prompt that starts a sequence (ask, a new file), then the answer, then
        padding to target_len + 1 ids with weight 0 (causal: it changes nothing before it)."""
        n = self.args.target_len
        ids = (prompt + answer)[-(n + 1):]
        n_ans = min(len(answer), len(ids) - 1)
        flags = [False] * (len(ids) - 1 - n_ans) + [True] * n_ans
        pad = n + 1 - len(ids)
        return (ids + [self.tok.eos_token_id] * pad, [1.0 if f else 0.0 for f in flags] + [0.0] * pad,
                flags + [False] * pad)

    def _ask_ids(self, question: str) -> list[int]:
        from longllama_lsp.engine import ask_prompt_ids

        return list(ask_prompt_ids(self.tok, question))

    def _ask_answer(self, text: str) -> list[int]:
        """An assistant turn: the sentence and end-of-turn (a chat template's eos), or " text" without one."""
        if getattr(self.tok, "chat_template", None):
            return _encode(self.tok, text) + [self.tok.eos_token_id]
        return _encode(self.tok, " " + text + "\n")

    # -- plain (the guard term) ---------------------------------------------------------------

    def plain(self, rng: random.Random) -> list[int]:
        """lm_len + 1 consecutive ids of a training file, scored without memory (fewer if none is that long)."""
        return self._code_ids(rng, self.args.lm_len + 1)

    # -- mix ----------------------------------------------------------------------------------

    def example(self, rng: random.Random) -> Example:
        kinds = [k for k in KINDS if self.args.mix.get(k, 0) > 0]
        for _ in range(10):
            kind = rng.choices(kinds, [self.args.mix[k] for k in kinds])[0]
            ex = getattr(self, kind)(rng)
            if ex is not None:
                return ex
        raise RuntimeError("no example could be made in 10 tries (are there packages with imports?)")

    def pool(self, rng: random.Random) -> tuple[list[list[int]], list[int], list[list[int]]]:
        """(distinct chunks, repeat count of each, their contexts) for the shared distractor pool."""
        a = self.args
        code = [run for run in (self._code_run(rng, a.chunk_len) for _ in range(a.pool_code_chunks)) if run[1]]
        filler = [(self._filler_context(rng), self.filler_chunk(rng)) for _ in range(a.pool_filler_chunks)]
        return ([c for _, c in code + filler], [1] * len(code) + [a.pool_filler_repeat] * len(filler),
                [ctx for ctx, _ in code + filler])


def build_maker(args: MixArgs, tokenizer: Any) -> ExampleMaker:
    packages = find_packages(args.roots, args.held_out, max_files=args.max_files_per_package, seed=args.seed)
    print(f"retrieval data: {len(packages)} packages, {sum(len(p.files) for p in packages)} files "
          f"from {', '.join(args.roots)} (held out: {', '.join(args.held_out)})", file=sys.stderr)
    return ExampleMaker(Corpus(packages, tokenizer), args)
