"""File suffix -> language, and for the nine tree-sitter languages which nodes are definitions.

The chunker only needs to know, for a syntax node: is it a definition (and of what kind, with what
name), does it wrap one (decorators, `export`, `template<>`), and is it a comment-like node that
belongs to the definition after it. Everything else is generic tree walking in `chunker.py`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

import tree_sitter as ts

# Kinds whose nested functions are methods (the chunker names them `Outer.inner` either way).
CLASS_LIKE = frozenset({"class", "interface", "struct", "enum", "impl", "trait"})

_FUNCTION_VALUES = frozenset(
    {"arrow_function", "function_expression", "function", "generator_function", "class"}
)
_NAME_LEAVES = frozenset(
    {
        "identifier",
        "field_identifier",
        "qualified_identifier",
        "destructor_name",
        "operator_name",
        "type_identifier",
        "property_identifier",
        "private_property_identifier",
    }
)


@dataclass(frozen=True)
class LanguageSpec:
    """How to read one tree-sitter grammar's definitions."""

    name: str
    module: str  # the per-language wheel, e.g. "tree_sitter_python"
    entry: str  # its function returning the language pointer
    definitions: Mapping[str, str]  # node type -> chunk kind
    wrappers: frozenset[str] = frozenset()  # nodes that wrap a definition (decorators, export, template)
    value_definitions: frozenset[str] = (
        frozenset()
    )  # `const f = () => …` style: a definition if the value is a function
    attach_forward: frozenset[str] = frozenset({"comment"})  # comments/decorators glued to the next node
    extensions: tuple[str, ...] = field(default=())


_JS_DEFS = {
    "function_declaration": "function",
    "generator_function_declaration": "function",
    "class_declaration": "class",
    "method_definition": "method",
}
_TS_DEFS = {
    **_JS_DEFS,
    "abstract_class_declaration": "class",
    "interface_declaration": "interface",
    "type_alias_declaration": "type",
    "enum_declaration": "enum",
    "internal_module": "namespace",
    "module": "namespace",
    "method_signature": "method",
    "abstract_method_signature": "method",
    "function_signature": "function",
}
_JS_WRAPPERS = frozenset({"export_statement", "expression_statement", "ambient_declaration"})
_JS_VALUES = frozenset(
    {"lexical_declaration", "variable_declaration", "field_definition", "public_field_definition"}
)
_C_DEFS = {
    "function_definition": "function",
    "struct_specifier": "struct",
    "union_specifier": "struct",
    "enum_specifier": "enum",
    "type_definition": "type",
}

SPECS: dict[str, LanguageSpec] = {
    spec.name: spec
    for spec in [
        LanguageSpec(
            "python",
            "tree_sitter_python",
            "language",
            {"function_definition": "function", "class_definition": "class"},
            wrappers=frozenset({"decorated_definition"}),
            extensions=(".py", ".pyi", ".pyw"),
        ),
        LanguageSpec(
            "javascript",
            "tree_sitter_javascript",
            "language",
            _JS_DEFS,
            wrappers=_JS_WRAPPERS,
            value_definitions=_JS_VALUES,
            attach_forward=frozenset({"comment", "decorator"}),
            extensions=(".js", ".mjs", ".cjs", ".jsx"),
        ),
        LanguageSpec(
            "typescript",
            "tree_sitter_typescript",
            "language_typescript",
            _TS_DEFS,
            wrappers=_JS_WRAPPERS,
            value_definitions=_JS_VALUES,
            attach_forward=frozenset({"comment", "decorator"}),
            extensions=(".ts", ".mts", ".cts"),
        ),
        LanguageSpec(
            "tsx",
            "tree_sitter_typescript",
            "language_tsx",
            _TS_DEFS,
            wrappers=_JS_WRAPPERS,
            value_definitions=_JS_VALUES,
            attach_forward=frozenset({"comment", "decorator"}),
            extensions=(".tsx",),
        ),
        LanguageSpec(
            "go",
            "tree_sitter_go",
            "language",
            {"function_declaration": "function", "method_declaration": "method", "type_declaration": "type"},
            extensions=(".go",),
        ),
        LanguageSpec(
            "rust",
            "tree_sitter_rust",
            "language",
            {
                "function_item": "function",
                "function_signature_item": "function",
                "struct_item": "struct",
                "union_item": "struct",
                "enum_item": "enum",
                "trait_item": "trait",
                "impl_item": "impl",
                "mod_item": "module",
                "macro_definition": "macro",
                "type_item": "type",
            },
            attach_forward=frozenset(
                {"line_comment", "block_comment", "attribute_item", "inner_attribute_item"}
            ),
            extensions=(".rs",),
        ),
        LanguageSpec(
            "java",
            "tree_sitter_java",
            "language",
            {
                "class_declaration": "class",
                "interface_declaration": "interface",
                "enum_declaration": "enum",
                "record_declaration": "class",
                "annotation_type_declaration": "interface",
                "method_declaration": "method",
                "constructor_declaration": "method",
                "compact_constructor_declaration": "method",
            },
            attach_forward=frozenset({"line_comment", "block_comment"}),
            extensions=(".java",),
        ),
        LanguageSpec("c", "tree_sitter_c", "language", _C_DEFS, extensions=(".c", ".h")),
        LanguageSpec(
            "cpp",
            "tree_sitter_cpp",
            "language",
            {**_C_DEFS, "class_specifier": "class", "namespace_definition": "namespace"},
            wrappers=frozenset({"template_declaration", "linkage_specification"}),
            extensions=(".cc", ".cpp", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp", ".inl", ".tpp"),
        ),
    ]
}

_BY_SUFFIX = {ext: spec.name for spec in SPECS.values() for ext in spec.extensions}

# Text formats chunked by lines; the name is only informational (Chunk.language, `longllama status`).
_TEXT_SUFFIXES = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "rst",
    ".txt": "text",
    ".toml": "toml",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".jsonc": "json",
    ".ini": "ini",
    ".cfg": "ini",
    ".sh": "shell",
    ".bash": "shell",
    ".zsh": "shell",
    ".html": "html",
    ".css": "css",
    ".scss": "css",
    ".sql": "sql",
    ".xml": "xml",
    ".rb": "ruby",
    ".php": "php",
    ".kt": "kotlin",
    ".swift": "swift",
    ".cs": "csharp",
    ".lua": "lua",
    ".el": "elisp",
    ".vim": "vim",
    ".dockerfile": "dockerfile",
    ".kts": "kotlin",
    ".scala": "scala",
    ".vue": "vue",
    ".svelte": "svelte",
    ".m": "objc",
    ".mm": "objc",
}
_TEXT_NAMES = {"Dockerfile": "dockerfile", "Makefile": "make", "CMakeLists.txt": "cmake", "justfile": "make"}
_CPP_MARKERS = (b"class ", b"namespace ", b"template<", b"template <", b"std::", b"public:")


def named_suffixes() -> frozenset[str]:
    """Every file suffix with a language or format name (`.py`, `.md`, ...): what a question naming a file
    ends in (longllama_lsp.lexical), beside what the indexer calls each file."""
    return frozenset(_BY_SUFFIX) | frozenset(_TEXT_SUFFIXES)


def language_for(path: str | PurePath, head: bytes = b"") -> str:
    """Language name for a file: one of SPECS' names, or a text format name ("text" if unknown).

    `.h` is C unless its first bytes (`head`) show C++ (the C grammar errors on classes).
    """
    p = PurePath(path)
    suffix = p.suffix.lower()
    if suffix == ".h" and any(m in head for m in _CPP_MARKERS):
        return "cpp"
    if suffix in _BY_SUFFIX:
        return _BY_SUFFIX[suffix]
    return _TEXT_NAMES.get(p.name) or _TEXT_SUFFIXES.get(suffix, "text")


@functools.cache
def ts_language(name: str) -> ts.Language | None:
    """The tree-sitter Language for a SPECS name (None for text formats or a missing grammar wheel)."""
    spec = SPECS.get(name)
    if spec is None:
        return None
    try:
        return ts.Language(getattr(importlib.import_module(spec.module), spec.entry)())
    except (ImportError, AttributeError, ValueError):
        return None


@dataclass(frozen=True)
class Definition:
    kind: str
    name: str | None


def definition_of(node: ts.Node, spec: LanguageSpec) -> Definition | None:
    """The definition `node` stands for (looking through wrappers), or None for plain statements."""
    for _ in range(4):  # wrappers nest at most a few deep: export > decorated > class
        kind = spec.definitions.get(node.type)
        if kind is not None:
            return _checked_definition(node, kind)
        if node.type in spec.value_definitions:
            return _value_definition(node)
        if node.type not in spec.wrappers:
            return None
        inner = node.child_by_field_name("definition") or node.child_by_field_name("declaration")
        if inner is None:
            inner = next(
                (
                    c
                    for c in node.named_children
                    if c.type not in spec.attach_forward and c.type != "template_parameter_list"
                ),
                None,
            )
        if inner is None:
            return None
        node = inner
    return None


def _checked_definition(node: ts.Node, kind: str) -> Definition | None:
    # C-family `struct foo` is only a definition with a body; `typedef int x;` is a statement.
    if node.type in ("struct_specifier", "union_specifier", "enum_specifier"):
        if node.child_by_field_name("body") is None:
            return None
    if node.type == "type_definition":
        type_node = node.child_by_field_name("type")
        if type_node is None or type_node.child_by_field_name("body") is None:
            return None
    if node.type == "type_declaration":
        return _go_type(node)
    return Definition(kind, definition_name(node))


def _value_definition(node: ts.Node) -> Definition | None:
    """`const f = () => …`, `foo = function () {…}` in a class body, `const C = class {…}`."""
    declarators = [c for c in node.named_children if c.type == "variable_declarator"] or [node]
    if len(declarators) != 1:
        return None
    value = declarators[0].child_by_field_name("value")
    if value is None or value.type not in _FUNCTION_VALUES:
        return None
    kind = "class" if value.type == "class" else "function"
    if node.type in ("field_definition", "public_field_definition"):
        kind = "method"
    name = declarators[0].child_by_field_name("name") or declarators[0].child_by_field_name("property")
    return Definition(kind, _text(name))


def _go_type(node: ts.Node) -> Definition | None:
    spec = next((c for c in node.named_children if c.type in ("type_spec", "type_alias")), None)
    if spec is None:
        return None
    type_node = spec.child_by_field_name("type")
    kinds = {"struct_type": "struct", "interface_type": "interface"}
    return Definition(
        kinds.get(type_node.type if type_node else "", "type"), _text(spec.child_by_field_name("name"))
    )


def definition_name(node: ts.Node) -> str | None:
    """The name a definition node introduces, `::`-qualified C++ names written with dots."""
    if node.type == "method_declaration" and node.child_by_field_name("receiver") is not None:
        return _go_method_name(node)
    if node.type == "impl_item":
        type_node = node.child_by_field_name("type")
        return _text(type_node).split("<")[0] if type_node is not None else None
    name = node.child_by_field_name("name")
    if name is not None:
        return _text(name)
    # C/C++ functions and typedefs: the name sits at the bottom of a declarator chain.
    declarator = node.child_by_field_name("declarator")
    for _ in range(16):
        if declarator is None:
            return None
        if declarator.type in _NAME_LEAVES:
            return _text(declarator).replace("::", ".")
        declarator = declarator.child_by_field_name("declarator") or next(
            (c for c in declarator.named_children if c.type in _NAME_LEAVES or c.type.endswith("declarator")),
            None,
        )
    return None


def _go_method_name(node: ts.Node) -> str | None:
    receiver = node.child_by_field_name("receiver")
    name = _text(node.child_by_field_name("name"))
    stack = [receiver] if receiver is not None else []
    while stack:  # first type_identifier in the receiver: `(s *Server[T])` -> Server
        n = stack.pop()
        if n.type == "type_identifier":
            return f"{_text(n)}.{name}"
        stack.extend(reversed(n.named_children))
    return name


def _text(node: ts.Node | None) -> str | None:
    if node is None or node.text is None:
        return None
    return node.text.decode("utf-8", "replace")
