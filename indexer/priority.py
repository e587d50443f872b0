"""Which files to index first: the open files, what they import, what changed lately, then the rest.

A full first index of a mid-sized repository takes many minutes on a CPU; a user in an editor needs
the memory of the file they are in and its neighbours now. `tiers(...)` orders the walk's paths:

    open       the files open in an editor (`longllama index --first PATH`, the server's documents)
    imports    what those import (tree-sitter import statements, resolved to repository files;
               nothing is executed or imported), in statement order until READY_BYTES of source
    further    the imports over that budget, then what the imports import in turn (in a tightly
               coupled package this is most of it)
    recent     files touched by the last commits (`git log`, read-only) and files edited since
    rest       everything else, in walk order

Import resolution is by path, not by a language's module system: `from .a import b` and
`import pkg.a` look for `pkg/a.py`, `pkg/a/__init__.py` or `pkg/a/b.py` anywhere a suffix of the
repository path matches; `import "./x"` (JS/TS) and `#include "x.h"` (C/C++) are relative to the
importing file or match a path suffix; a Go import matches the files of a directory whose path ends
with the import path. A miss costs only ordering, never correctness: every file is indexed anyway.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import tree_sitter as ts

from indexer.languages import ts_language
from indexer.walker import WalkedFile

logger = logging.getLogger(__name__)

RECENT_COMMITS = 30  # commits whose files count as recently changed
GIT_TIMEOUT_S = 10
# Source bytes of the open files' neighbourhood ('open' + 'imports') to have in memory first: ~6k
# tokens at the ~3.8 bytes/token SmolLM2's tokenizer gives Python (cattrs), about a minute of encoding
# at ~100 tokens/s on a busy 2-core CPU. An import hub (cattrs/converters.py imports 22.8k tokens)
# would otherwise hold the 'ready' report for minutes. The open files themselves always go first.
READY_BYTES = 24_000
_JS_SUFFIXES = ("", ".ts", ".tsx", ".js", ".jsx", ".mjs", ".cjs", "/index.ts", "/index.tsx", "/index.js")


@dataclass
class Tiers:
    """Repository paths in indexing order; every path of the walk is in exactly one tier."""

    open: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    further: list[str] = field(default_factory=list)
    recent: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)

    def named(self) -> list[tuple[str, list[str]]]:
        return [("open files", self.open), ("their imports", self.imports), ("imports of imports", self.further),
                ("recently changed", self.recent), ("the rest", self.rest)]


def tiers(files: Mapping[str, WalkedFile], first: Iterable[str], read: Callable[[str], bytes | None],
          recent: Sequence[str] = (), ready_bytes: int | None = None) -> Tiers:
    """Order the walk's `files` (repository-relative, '/'-separated path -> its file, in walk order).

    first: the open files (those not in `files` are ignored); read: a path's bytes, or None (only
    files whose imports are parsed are read: sizes and languages are the walk's); recent: recently
    changed paths, newest first (see `recently_changed`); ready_bytes: the budget of 'open' +
    'imports' (default READY_BYTES; an import that does not fit goes to 'further', a smaller later
    one may fit).
    """
    ready_bytes = READY_BYTES if ready_bytes is None else ready_bytes
    known = set(files)
    out, placed = Tiers(), set()

    def place(tier: list[str], items: Iterable[str]) -> None:
        for p in items:
            if p in known and p not in placed:
                placed.add(p)
                tier.append(p)

    def imports_of(path: str) -> list[str]:
        return imported_paths(path, files[path].language, read(path), known)

    place(out.open, first)
    imports = [t for p in out.open for t in imports_of(p)]
    place(out.imports, _within(imports, ready_bytes - sum(files[p].size for p in out.open), files))
    # The direct imports over the budget first: they are closer than the imports of imports.
    place(out.further, imports + [t for p in out.imports for t in imports_of(p)])
    place(out.recent, recent)
    place(out.rest, files)
    return out


def _within(paths: list[str], room: int, files: Mapping[str, WalkedFile]) -> list[str]:
    """The paths, in order, that fit in `room` bytes; one too large is passed over, not the rest."""
    out = []
    for p in dict.fromkeys(paths):
        if (size := files[p].size) <= room:
            out.append(p)
            room -= size
    return out


# -- imports ----------------------------------------------------------------------------------------

def imported_paths(path: str, language: str, data: bytes | None, known: set[str]) -> list[str]:
    """Repository files that `path` (in `language`, languages.language_for's name) imports, in the
    order of its import statements."""
    if not data:
        return []
    finder = _FINDERS.get(language)
    grammar = ts_language(language) if finder else None
    if grammar is None:
        return []
    try:
        root = ts.Parser(grammar).parse(data).root_node
    except (ValueError, RuntimeError) as exc:  # a grammar that cannot parse it: order only
        logger.debug("cannot parse %s for imports: %s", path, exc)
        return []
    out: list[str] = []
    for spec in finder(root):
        out += [p for p in _resolve(language, path, spec, known) if p not in out and p != path]
    return out


def _walk(root: ts.Node, types: frozenset[str], descend_into: frozenset[str]) -> Iterable[ts.Node]:
    """Nodes of `types`, looking inside only statement-like containers (imports are never deep)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node.type in types:
            yield node
            continue
        if node is root or node.type in descend_into:
            stack.extend(reversed(node.named_children))


def _text(node: ts.Node | None) -> str:
    return node.text.decode("utf-8", "replace") if node is not None and node.text else ""


_PY_BLOCKS = frozenset({"if_statement", "try_statement", "block", "else_clause", "except_clause",
                        "elif_clause", "finally_clause", "with_statement", "function_definition",
                        "class_definition", "decorated_definition"})


def _python_imports(root: ts.Node) -> Iterable[str]:
    """Dotted module names; relative ones keep their dots; `from m import a` also yields `m.a`."""
    for node in _walk(root, frozenset({"import_statement", "import_from_statement"}), _PY_BLOCKS):
        if node.type == "import_statement":
            for name in node.named_children:
                yield _text(name.child_by_field_name("name") if name.type == "aliased_import" else name)
            continue
        module = _text(node.child_by_field_name("module_name"))
        yield module
        for name in node.children_by_field_name("name"):
            leaf = _text(name.child_by_field_name("name") if name.type == "aliased_import" else name)
            yield f"{module}{'' if module.endswith('.') else '.'}{leaf}"


_JS_BLOCKS = frozenset({"statement_block", "if_statement", "try_statement", "expression_statement",
                        "lexical_declaration", "variable_declaration", "variable_declarator",
                        "call_expression", "await_expression", "arguments"})


def _js_imports(root: ts.Node) -> Iterable[str]:
    for node in _walk(root, frozenset({"import_statement", "export_statement", "call_expression"}), _JS_BLOCKS):
        if node.type == "call_expression":
            if _text(node.child_by_field_name("function")) not in ("require", "import"):
                continue
            args = node.child_by_field_name("arguments")
            source = next((c for c in args.named_children if c.type == "string"), None) if args else None
        else:
            source = node.child_by_field_name("source")
        if source is not None:
            yield _text(source).strip("'\"`")


def _c_includes(root: ts.Node) -> Iterable[str]:
    blocks = frozenset({"preproc_ifdef", "preproc_if", "preproc_else", "preproc_elif", "linkage_specification",
                        "declaration_list", "namespace_definition"})
    for node in _walk(root, frozenset({"preproc_include"}), blocks):
        target = node.child_by_field_name("path")
        if target is not None and target.type == "string_literal":  # <system> headers are not ours
            yield _text(target).strip('"')


def _go_imports(root: ts.Node) -> Iterable[str]:
    for node in _walk(root, frozenset({"import_spec"}), frozenset({"import_declaration", "import_spec_list"})):
        yield _text(node.child_by_field_name("path")).strip('"`')


_FINDERS: dict[str, Callable[[ts.Node], Iterable[str]]] = {
    "python": _python_imports, "javascript": _js_imports, "typescript": _js_imports, "tsx": _js_imports,
    "c": _c_includes, "cpp": _c_includes, "go": _go_imports,
}


def _resolve(language: str, path: str, spec: str, known: set[str]) -> list[str]:
    here = PurePosixPath(path).parent
    if language == "python":
        return _resolve_python(here, spec, known)
    if language == "go":
        return sorted(p for p in known if p.endswith(".go") and not p.endswith("_test.go")
                      and _is_package_dir(str(PurePosixPath(p).parent), spec))
    if language in ("c", "cpp"):
        return _first_known([_normal(here / spec)], known) or _by_suffix(spec, known)
    if spec.startswith("."):  # JS/TS: bare specifiers are packages, not repository files
        return _first_known([_normal(here / f"{spec}{s}" if s.startswith("/") or not s else here / (spec + s))
                             for s in _JS_SUFFIXES], known)
    return []


def _resolve_python(here: PurePosixPath, spec: str, known: set[str]) -> list[str]:
    dots = len(spec) - len(spec.lstrip("."))
    parts = [p for p in spec[dots:].split(".") if p]
    candidates = [f"{'/'.join(parts)}.py", f"{'/'.join(parts)}/__init__.py"] if parts else ["__init__.py"]
    if dots:  # relative to the importing file's package, one level up per extra dot
        base = here
        for _ in range(dots - 1):
            base = base.parent
        return _first_known([_normal(base / c) for c in candidates], known)
    for c in candidates:
        hits = _by_suffix(c, known)
        if hits:
            return hits[:1] if len(hits) == 1 else sorted(hits, key=len)[:1]  # the shallowest package
    return []


def _normal(p: PurePosixPath) -> str:
    return os.path.normpath(str(p)).lstrip("./") if str(p) not in (".", "") else ""


def _first_known(candidates: Iterable[str], known: set[str]) -> list[str]:
    return next(([c] for c in candidates if c in known), [])


def _by_suffix(suffix: str, known: set[str]) -> list[str]:
    return [p for p in known if p == suffix or p.endswith("/" + suffix)]


def _is_package_dir(directory: str, import_path: str) -> bool:
    """`example.com/mod/pkg/sub` is the directory `pkg/sub` of a repository rooted at the module."""
    return directory not in ("", ".") and (import_path == directory or import_path.endswith("/" + directory))


# -- recently changed -------------------------------------------------------------------------------

# Read-only git, hardened: no fsmonitor hook, no optional index locks, no pager, no textconv or
# external diff, no system or global config, no prompts. Hooks never run for status or log. No
# git, not a repository, or one git refuses (another user's: safe.directory): the tier is empty.
_GIT = ("git", "--no-pager", "-c", "core.fsmonitor=false", "--no-optional-locks")


def recently_changed(root: str | os.PathLike) -> list[str]:
    """Files changed in the work tree (git status), then those the last commits touched, newest first."""
    status = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=normal", "--no-renames")
    if status is None:
        return []
    log = _git(root, "log", f"-n{RECENT_COMMITS}", "--no-textconv", "--no-ext-diff", "--no-renames",
               "--relative", "--name-only", "--format=", "-z") or ""
    # status -z entries are "XY path"; its paths are relative to the repository's top, log's (with
    # --relative) to root: `rev-parse --show-prefix` maps one onto the other.
    prefix = (_git(root, "rev-parse", "--show-prefix") or "").strip()
    changed = [e[3:] for e in status.split("\0") if len(e) > 3 and e[2] == " "]
    changed = [p[len(prefix):] for p in changed if p.startswith(prefix)]
    out: list[str] = []
    for p in [*changed, *log.split("\0")]:
        p = p.strip("\n")
        if p and p not in out:
            out.append(p)
    return out


def _git(root: str | os.PathLike, *args: str) -> str | None:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
           "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run([*_GIT, "-C", str(root), *args], capture_output=True, env=env, timeout=GIT_TIMEOUT_S,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode("utf-8", "surrogateescape") if done.returncode == 0 else None
