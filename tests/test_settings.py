"""settings.py: camelCase initializationOptions -> nested dataclasses; bad values -> message + default.

Test Data: inline dictionaries shaped like an editor's initializationOptions.
"""

from __future__ import annotations

import pytest

from longllama_lsp.settings import Settings, parse_settings, settings_table, to_camel_dict


def test_camel_case_options_fill_nested_dataclasses():
    s, problems = parse_settings({"model": {"path": "/m", "dtype": "bfloat16"},
                                  "completion": {"mode": "block", "maxTokens": 64, "debounceMs": 0},
                                  "memory": {"enabled": False, "budgetTokens": 1024},
                                  "indexing": {"enabled": False}, "logLevel": "debug", "token": "not a setting"})
    assert problems == []
    assert (s.model.path, s.model.dtype, s.completion.mode, s.completion.max_tokens) == ("/m", "bfloat16", "block", 64)
    assert s.completion.debounce_ms == 0 and not s.memory.enabled and not s.indexing.enabled and s.log_level == "debug"


@pytest.mark.parametrize("options, key", [
    ({"completion": {"maxTokens": "12"}}, "completion.maxTokens"),  # no string -> int coercion
    ({"completion": {"maxTokens": 0}}, "completion.maxTokens"),  # below the minimum
    ({"completion": {"mode": "paragraph"}}, "completion.mode"),
    ({"memory": {"enabled": "no"}}, "memory.enabled"),  # no truthy strings
    ({"completion": {"debounceMs": True}}, "completion.debounceMs"),  # a bool is not an int
    ({"logLevel": 3}, "logLevel"),
    ({"memory": 5}, "memory"),
    ({"completoin": {}}, "completoin"),  # a typo is reported, not silently ignored
])
def test_bad_values_name_their_key_and_fall_back_to_defaults(options, key):
    s, problems = parse_settings({**options, "ask": {"maxTokens": 99}})
    assert len(problems) == 1 and problems[0].startswith(key + ":")
    assert s.ask.max_tokens == 99  # the good parts are kept
    defaults = to_camel_dict(Settings())
    assert {k: v for k, v in to_camel_dict(s).items() if k != "ask"} == {k: v for k, v in defaults.items()
                                                                        if k != "ask"}


def test_not_an_object():
    s, problems = parse_settings(["model"])
    assert s == Settings() and problems == ["settings: expected an object, got list (using defaults)"]
    assert parse_settings(None) == (Settings(), [])


def test_updates_keep_unmentioned_keys_from_the_base():
    base, _ = parse_settings({"completion": {"maxTokens": 100}, "logLevel": "debug"})
    s, problems = parse_settings({"completion": {"mode": "block"}}, base=base)
    assert not problems and s.completion.max_tokens == 100 and s.completion.mode == "block" and s.log_level == "debug"


def test_settings_table_lists_every_setting_with_type_default_and_description():
    table = settings_table()
    names = [row["name"] for row in table]
    assert "completion.maxTokens" in names and "memory.budgetTokens" in names and "logLevel" in names
    assert all(row["description"] and row["type"] for row in table)
    row = next(r for r in table if r["name"] == "completion.mode")
    assert row["type"] == '"line" | "block"' and row["default"] == "line"
    assert next(r for r in table if r["name"] == "completion.maxTokens")["min"] == 1
    # the table's names are exactly the keys the parser accepts
    options: dict = {}
    for row in table:
        *sections, leaf = row["name"].split(".")
        node = options
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = row["default"]
    assert parse_settings(options) == (Settings(), []) and options == to_camel_dict(Settings())


def test_the_default_settings_are_the_engines_own_defaults():
    """Two tables hold each default (the settings tree for editors and docs, EngineOptions for the CLI and
    the bench): a default changed in one only would make `longllama complete` and the editor disagree."""
    import dataclasses

    from longllama_lsp.engine import EngineOptions
    from longllama_lsp.shared import engine_options

    server, engine = engine_options(Settings()), EngineOptions()
    server_only = {"defer_edits", "defer_idle_ms"}  # a language server's next keystroke picks up the edits
    differ = {f.name for f in dataclasses.fields(EngineOptions)
              if f.name not in server_only and getattr(server, f.name) != getattr(engine, f.name)}
    assert differ == set()
