"""The server's settings tree: nested dataclasses read from camelCase `initializationOptions` and
`workspace/didChangeConfiguration`.

Every field carries its description (and bounds) in `metadata`, so `settings_table()` can hand the
docs generator and editor plugins one machine-readable list. Parsing never fails: a bad value is
reported by its dotted camelCase key and replaced by that key's default; the rest is kept
(jedi-language-server's `lsp_initialize` pattern, house style 9).

    {"model": {"path": null, "device": null, "dtype": null, "decodeDtype": null},
     "completion": {"mode": "line", "maxTokens": 48, "debounceMs": 75, "boundaryDebounceMs": 0,
                    "contextTokens": null},
     "ask": {"maxTokens": 256},
     "memory": {"enabled": true, "budgetTokens": 1048576, "selectTokens": 2048, "retrieveTokens": 4096,
                "knnWeight": 0.3},
     "indexing": {"enabled": true},
     "logLevel": "info"}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import cattrs

# Keys of initializationOptions that are not settings (checked elsewhere), so not "unknown".
NON_SETTING_KEYS = frozenset({"token"})


def _doc(text: str, **bounds: Any) -> dict[str, Any]:
    return {"doc": text, **bounds}


@dataclass
class ModelSettings:
    # None: --model, $LONGLLAMA_MODEL, else the bundled SmolLM2-135M-Instruct (converted on first use).
    path: str | None = field(default=None, metadata=_doc(
        "LongLLaMA checkpoint dir, LLaMA dir or GGUF file (default: $LONGLLAMA_MODEL, else bundled SmolLM2)"))
    device: str | None = field(default=None, metadata=_doc("cpu, cuda, cuda:1 ... (default: cuda when present)"))
    dtype: Literal["float32", "bfloat16", "float16"] | None = field(default=None, metadata=_doc(
        "compute dtype (default: float32 on cpu, bfloat16 on cuda)"))
    decode_dtype: Literal["float32", "bfloat16", "float16"] | None = field(default=None, metadata=_doc(
        "weights for steps of a few tokens (decoding, typing); default bfloat16 copies when the model "
        "runs in float32 on a CPU: ~1.5x faster decoding for 2 bytes more per parameter"))


@dataclass
class CompletionSettings:
    mode: Literal["line", "block"] = field(default="line", metadata=_doc(
        "line: stop at the end of the line (on a blank line: text at the cursor's indentation, never an empty "
        "suggestion; a line that opens a bracket the model breaks after goes on to the line that closes it); "
        "block: stop when the indentation drops below the cursor's block (or at the last whole line when "
        "maxTokens runs out)"))
    # 48 tokens ~ one long line or a short block; keeps CPU latency under a second on SmolLM2-135M.
    max_tokens: int = field(default=48, metadata=_doc("most tokens generated per completion", min=1, max=1024))
    # 75 ms: the low end of what peers use (75-350 ms); typing faster than this never reaches the model.
    debounce_ms: int = field(default=75, metadata=_doc(
        "wait this long after an automatic trigger inside a word before generating", min=0, max=5000))
    # Typists pause after a word (space, punctuation): waiting there only adds latency. Typing on
    # costs at most one model step, cancelled (engine: checked between steps).
    boundary_debounce_ms: int = field(default=0, metadata=_doc(
        "the same wait after a space or punctuation", min=0, max=5000))
    # None: window - maxTokens, capped by the model's last_context_length (spec §2.3 flush cliff).
    context_tokens: int | None = field(default=None, metadata=_doc(
        "tokens before the cursor kept as local context (the rest goes to memory)", min=8))


@dataclass
class AskSettings:
    max_tokens: int = field(default=256, metadata=_doc("most tokens in an answer to longllama/ask", min=1,
                                                        max=4096))


@dataclass
class MemorySettings:
    enabled: bool = field(default=True, metadata=_doc("attend to the repository and the rest of the file"))
    # 1M tokens ~ 2.4 GB of bf16 keys/values on SmolLM2-135M (2,304 B/token): a whole ordinary
    # repository; sparse attention (selectTokens) keeps the cost per token near that of no memory.
    budget_tokens: int = field(default=1 << 20, metadata=_doc(
        "most repository tokens kept in memory (lower-priority chunks are evicted)", min=0))
    # 2048: BENCHMARKS.md "Sparse memory" (decode step at 1M tokens ~1.4x none; quality at budgets 512-8k).
    select_tokens: int | None = field(default=2048, metadata=_doc(
        "memory tokens each query attends to: the blocks of memory whose keys match it best "
        "(0 or null: all of memory, dense; slower as the repository grows)", min=0))
    # 4096: BENCHMARKS.md "Stop 32" (+0.017 +- 0.009 ES against every chunk on 215 fresh holes).
    retrieve_tokens: int = field(default=4096, metadata=_doc(
        "memory holds only the chunks of other files that best match the code before the cursor "
        "(completions: chunks defining the names it uses or imports first, then BM25 over identifiers) or the "
        "names in the question (ask; a question naming nothing in the code reads all of memory), up to this "
        "many tokens (0: every chunk)", min=0))
    # 0.3: BENCHMARKS.md "Stop 43" (bench/crossfile, the eighth hole set); answers: "Stop 44" (bench/ask_facts).
    knn_weight: float = field(default=0.3, metadata=_doc(
        "completions and answers mix the model's next-token distribution with the tokens that followed the memory "
        "positions most like the current one, with this weight (kNN-LM over a memory of at most 65536 tokens, "
        "as retrieveTokens keeps it; 0: off)", min=0, max=0.9))


@dataclass
class IndexingSettings:
    enabled: bool = field(default=True, metadata=_doc("index the workspace folders and watch them for changes"))


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    ask: AskSettings = field(default_factory=AskSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    indexing: IndexingSettings = field(default_factory=IndexingSettings)
    log_level: Literal["error", "warning", "info", "debug"] = field(default="info", metadata=_doc(
        "log level for stderr / --log-file and window/logMessage"))


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _strict_converter() -> cattrs.Converter:
    """cattrs, minus its coercions: "12" is not an int and "no" is not True."""
    conv = cattrs.Converter()

    def exact(kind: type, accept: tuple[type, ...]):
        def hook(value: Any, _: type) -> Any:
            if isinstance(value, bool) and kind is not bool or not isinstance(value, accept):
                raise TypeError(f"expected {_type_name(kind)}, got {value!r}")
            return kind(value)
        return hook

    conv.register_structure_hook(int, exact(int, (int,)))
    conv.register_structure_hook(float, exact(float, (int, float)))
    conv.register_structure_hook(bool, exact(bool, (bool,)))
    conv.register_structure_hook(str, exact(str, (str,)))
    return conv


_CONVERTER = _strict_converter()


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def parse_settings(data: Any, base: Settings | None = None) -> tuple[Settings, list[str]]:
    """Settings from a camelCase mapping, and a list of problems ("completion.maxTokens: expected ...").

    Keys missing from `data` take their value from `base` (default: the defaults); bad values take
    the default of their key.
    """
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"settings: expected an object, got {type(data).__name__} (using defaults)")
        data = {}
    base = base or Settings()
    return _parse_section(Settings, data, base, Settings(), "", problems), problems


def _parse_section(cls: type, data: dict, base: Any, defaults: Any, prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    known = {camel(f.name) for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known and not (prefix == "" and key in NON_SETTING_KEYS):
            problems.append(f"{prefix}{key}: unknown setting (ignored)")
    values = {}
    for f in dataclasses.fields(cls):
        key, tp = camel(f.name), hints[f.name]
        current, default = getattr(base, f.name), getattr(defaults, f.name)
        if key not in data:
            values[f.name] = current
        elif _is_section(tp):
            sub = data[key]
            if not isinstance(sub, dict):
                problems.append(f"{prefix}{key}: expected an object, got {sub!r} (using defaults)")
                values[f.name] = default
            else:
                values[f.name] = _parse_section(tp, sub, current, default, f"{prefix}{key}.", problems)
        else:
            values[f.name] = _parse_value(f, tp, data[key], default, f"{prefix}{key}", problems)
    return cls(**values)


def _parse_value(f: dataclasses.Field, tp: Any, raw: Any, default: Any, key: str, problems: list[str]) -> Any:
    try:
        value = _CONVERTER.structure(raw, tp)
    except Exception:  # cattrs wraps the hook's TypeError; say what was expected instead
        problems.append(f"{key}: expected {_type_name(tp)}, got {raw!r} (using default {default!r})")
        return default
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        problems.append(f"{key}: {value!r} is outside {_bounds(lo, hi)} (using default {default!r})")
        return default
    return value


def _bounds(lo: Any, hi: Any) -> str:
    return f"{lo}..{hi}" if hi is not None else f">= {lo}"


def _type_name(tp: Any) -> str:
    """A JSON-schema-ish name: integer, number, boolean, string, "a" | "b", ... | null."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a).replace("'", '"') for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "integer", float: "number", bool: "boolean", str: "string", type(None): "null"}.get(tp, str(tp))


def settings_table() -> list[dict[str, Any]]:
    """Every setting as {name, type, default, description[, min, max]}; name is the dotted camelCase key."""
    rows: list[dict[str, Any]] = []

    def walk(cls: type, instance: Any, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp, value = hints[f.name], getattr(instance, f.name)
            if _is_section(tp):
                walk(tp, value, f"{prefix}{camel(f.name)}.")
                continue
            row = {"name": prefix + camel(f.name), "type": _type_name(tp), "default": value,
                   "description": f.metadata.get("doc", "")}
            row.update({k: f.metadata[k] for k in ("min", "max") if k in f.metadata})
            rows.append(row)

    walk(Settings, Settings(), "")
    return rows


def to_camel_dict(settings: Settings) -> dict[str, Any]:
    """The settings as the camelCase mapping clients send (for `longllama/status` and docs)."""
    def conv(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {camel(f.name): conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return obj
    return conv(settings)
