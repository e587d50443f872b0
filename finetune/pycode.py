"""Python source facts from tree-sitter (never imported or run): what a file defines for other files,
every name it binds, its imports, and where identifiers occur. Shared by the retrieval training data
(finetune/retrieval_data.py) and the skill evaluation (finetune/skill_eval.py).

A *cross-file identifier* of file F in repository R: an occurrence in F of a name that F binds
nowhere (imports are not bindings) and that another file of R exports (module- or class-level
function, class or assignment). Builtins, keywords and names shorter than MIN_NAME are never
cross-file: they predict nothing about the repository.
"""

from __future__ import annotations

import builtins
import functools
import keyword
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import tree_sitter as ts

MIN_NAME = 3
NOT_CROSSFILE = frozenset(dir(builtins)) | frozenset(keyword.kwlist) | {"self", "cls"}

_DEFS = ("function_definition", "class_definition")
_TARGETS = ("assignment", "augmented_assignment", "for_statement", "for_in_clause", "with_item", "as_pattern")


@dataclass(frozen=True)
class Import:
    """`from <level dots><module> import names` or `import module` (level 0, names empty)."""

    level: int
    module: str  # dotted, "" for `from . import x`
    names: tuple[str, ...] = ()


@dataclass
class PyFacts:
    exports: set[str] = field(default_factory=set)  # module/class-level def, class, assignment names
    binds: set[str] = field(default_factory=set)  # every name the file binds (exports included)
    imports: list[Import] = field(default_factory=list)
    identifiers: list[tuple[int, int, str]] = field(default_factory=list)  # (start byte, end byte, name)


@functools.cache
def _parser() -> ts.Parser:
    from indexer.languages import ts_language

    lang = ts_language("python")
    if lang is None:
        raise RuntimeError("tree-sitter-python is not installed (pip install tree-sitter-python)")
    return ts.Parser(lang)


def _text(node: ts.Node | None) -> str:
    return node.text.decode("utf-8", "replace") if node is not None and node.text is not None else ""


def analyse(source: str | bytes) -> PyFacts:
    """Facts of one Python file (tree-sitter tolerates syntax errors: what parses is used)."""
    data = source.encode("utf-8") if isinstance(source, str) else source
    facts = PyFacts()
    stack: list[tuple[ts.Node, int, bool]] = [(_parser().parse(data).root_node, 0, False)]
    while stack:
        node, depth, in_import = stack.pop()
        kind = node.type
        if kind in _DEFS:
            name = _text(node.child_by_field_name("name"))
            facts.binds.add(name)
            if depth <= 1:  # module level or directly in a class body
                facts.exports.add(name)
        elif kind in ("import_statement", "import_from_statement"):
            facts.imports.extend(_imports(node))
            in_import = True
        elif kind in _TARGETS:
            left = node.child_by_field_name("left") or node.child_by_field_name("alias")
            names = [left] if left is not None and left.type == "identifier" else _identifiers(left)
            for n in names:
                facts.binds.add(_text(n))
                if depth <= 1 and kind == "assignment":
                    facts.exports.add(_text(n))
        elif kind in ("parameters", "lambda_parameters"):
            for p in node.named_children:
                n = p if p.type == "identifier" else p.child_by_field_name("name") or (
                    p.named_children[0] if p.named_children and p.named_children[0].type == "identifier" else None)
                if n is not None and n.type == "identifier":
                    facts.binds.add(_text(n))
        elif kind == "identifier" and not in_import:
            facts.identifiers.append((node.start_byte, node.end_byte, _text(node)))
        child_depth = depth + 1 if kind in ("function_definition", "class_definition") else depth
        if kind == "function_definition":
            child_depth = depth + 2  # names inside a function body are never exports
        for child in reversed(node.named_children):
            stack.append((child, child_depth, in_import))
    facts.identifiers.sort()
    return facts


def exports(source: str | bytes) -> set[str]:
    """`analyse(source).exports` without walking function bodies (fast: for whole repositories)."""
    data = source.encode("utf-8") if isinstance(source, str) else source
    out: set[str] = set()
    stack = [(_parser().parse(data).root_node, 0)]
    while stack:
        node, depth = stack.pop()
        for c in node.named_children:
            if c.type == "decorated_definition":
                c = c.child_by_field_name("definition") or c
            if c.type in _DEFS:
                out.add(_text(c.child_by_field_name("name")))
                if c.type == "class_definition" and depth == 0:
                    body = c.child_by_field_name("body")
                    if body is not None:
                        stack.append((body, 1))
            elif c.type == "expression_statement":
                for a in c.named_children:
                    if a.type == "assignment":
                        left = a.child_by_field_name("left")
                        out.update(_text(n) for n in ([left] if left is not None and left.type == "identifier"
                                                      else _identifiers(left)))
            elif c.type in ("if_statement", "try_statement", "with_statement", "block", "else_clause",
                            "elif_clause", "except_clause", "finally_clause"):
                stack.append((c, depth))
    return out


def _identifiers(node: ts.Node | None) -> list[ts.Node]:
    if node is None:
        return []
    if node.type == "identifier":
        return [node]
    if node.type in ("attribute", "subscript"):  # obj.x = ... binds nothing new in this file
        return []
    return [n for c in node.named_children for n in _identifiers(c)]


def _imports(node: ts.Node) -> list[Import]:
    if node.type == "import_statement":
        return [Import(0, _text(n.child_by_field_name("name") if n.type == "aliased_import" else n))
                for n in node.children_by_field_name("name")]
    mod = node.child_by_field_name("module_name")
    level, module = 0, _text(mod)
    if mod is not None and mod.type == "relative_import":
        prefix = next((c for c in mod.named_children if c.type == "import_prefix"), None)
        level = len(_text(prefix))
        module = _text(next((c for c in mod.named_children if c.type == "dotted_name"), None))
    names = tuple(_text(n.child_by_field_name("name") if n.type == "aliased_import" else n)
                  for n in node.children_by_field_name("name"))
    return [Import(level, module, names)]


def module_name(path: str) -> str:
    """'pkg/sub/mod.py' -> 'pkg.sub.mod'; 'pkg/sub/__init__.py' -> 'pkg.sub'."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve_imports(path: str, imports: Iterable[Import], modules: Mapping[str, str]) -> list[str]:
    """Paths (keys of the repository) that `path`'s imports name; `modules` = {module name: path}.

    `from .x import y` names x and, when y is a submodule, x.y; absolute imports count when the
    module is one of the repository's (e.g. `from pkg.x import y` inside pkg).
    """
    here = module_name(path).split(".")
    package = here if PurePosixPath(path).name == "__init__.py" else here[:-1]
    out: list[str] = []
    for imp in imports:
        if imp.level:
            base = package[: len(package) - (imp.level - 1)] if imp.level - 1 <= len(package) else []
            target = ".".join([*base, *([imp.module] if imp.module else [])])
        else:
            target = imp.module
        for name in (target, *(f"{target}.{n}" if target else n for n in imp.names)):
            p = modules.get(name)
            if p is not None and p != path and p not in out:
                out.append(p)
    return out


def crossfile_names(facts: PyFacts, other_exports: set[str]) -> set[str]:
    """Names whose occurrences in this file are cross-file identifiers (see the module docstring)."""
    used = {name for _, _, name in facts.identifiers}
    return {n for n in used & other_exports
            if n not in facts.binds and n not in NOT_CROSSFILE and len(n) >= MIN_NAME}


def token_flags(text: str, offsets: list[tuple[int, int]], spans: Iterable[tuple[int, int]]) -> list[bool]:
    """Per token (character `offsets`), whether it overlaps one of the byte `spans` of `text`."""
    data = text.encode("utf-8")
    if len(data) == len(text):  # ASCII: bytes are characters
        char_spans = sorted(spans)
    else:
        to_char = _byte_to_char(text)
        char_spans = sorted((to_char[s], to_char[e]) for s, e in spans)
    flags = [False] * len(offsets)
    j = 0
    for i, (s, e) in sorted(enumerate(offsets), key=lambda x: x[1]):
        while j < len(char_spans) and char_spans[j][1] <= s:
            j += 1
        k = j
        while k < len(char_spans) and char_spans[k][0] < e:
            if char_spans[k][1] > s and e > s:
                flags[i] = True
                break
            k += 1
    return flags


def _byte_to_char(text: str) -> list[int]:
    out = []
    for i, ch in enumerate(text):
        out.extend([i] * len(ch.encode("utf-8")))
    out.append(len(text))
    return out
