-- Drives the plugin the way a user would, headless, for tests/test_editors.py:
--   nvim --headless -n -u NONE --cmd 'set rtp+=editors/neovim' -c 'luafile editors/neovim/tests/drive.lua'
-- $LONGLLAMA_DRIVE names a JSON file {cmd, settings, inline, file, line, col, question, out};
-- results go to `out` as JSON: {steps, completion, line, answer, error}.
local cfg = vim.fn.json_decode(table.concat(vim.fn.readfile(os.getenv("LONGLLAMA_DRIVE")), "\n"))
local result = { steps = {} }
local longllama = require("longllama")

local function finish(err)
  result.error = err
  vim.fn.writefile({ vim.fn.json_encode(result) }, cfg.out)
  vim.cmd("qall!")
end

local t0 = vim.loop.now()
local function step(name)
  table.insert(result.steps, ("%s %.1fs"):format(name, (vim.loop.now() - t0) / 1000))
end

-- Calls `check` every 50 ms until it returns a value, then `next_step(value)`; fails after `ms`.
local function poll(what, ms, check, next_step)
  local deadline = vim.loop.now() + ms
  local function tick()
    local ok, value = pcall(check)
    if not ok then
      return finish(what .. ": " .. tostring(value))
    elseif value then
      step(what)
      return next_step(value)
    elseif vim.loop.now() > deadline then
      return finish("timed out waiting for " .. what)
    end
    vim.defer_fn(tick, 50)
  end
  tick()
end

local function keys(k, mode)
  vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(k, true, false, true), mode or "m", false)
end

local function ask()
  vim.cmd("stopinsert")
  vim.cmd("LongllamaAsk " .. cfg.question)
  poll("answer", 20000, function()
    for _, b in ipairs(vim.api.nvim_list_bufs()) do
      local ok, answer = pcall(vim.api.nvim_buf_get_var, b, "longllama_answer")
      if ok then
        result.answer = answer
        result.answer_lines = vim.api.nvim_buf_get_lines(b, 0, -1, false)
        return true
      end
    end
  end, function() finish(vim.NIL) end)
end

local function accepted()
  local line = vim.api.nvim_buf_get_lines(0, cfg.line - 1, cfg.line, false)[1]
  if line ~= cfg.before then
    result.line = line
    return true
  end
end

local function complete_inline()
  local ns = vim.api.nvim_get_namespaces()["nvim.lsp.inline_completion"]
  keys("A")
  poll("ghost text", 20000, function()
    for _, mark in ipairs(vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do
      local chunks = {}
      for _, chunk in ipairs(mark[4].virt_text or {}) do
        chunks[#chunks + 1] = chunk[1]
      end
      return table.concat(chunks)
    end
  end, function(ghost)
    result.completion = ghost
    keys("<Tab>") -- the plugin's accept mapping
    poll("accepted", 5000, accepted, ask)
  end)
end

local function complete_menu()
  keys("A<C-x><C-o>", "n") -- omnifunc (0.7-0.10) or vim.lsp.completion's omnifunc (0.11)
  poll("completion menu", 20000, function()
    local items = vim.fn.complete_info({ "items" }).items
    return #items > 0 and items
  end, function(items)
    result.completion = items[1].word
    keys("<C-y>", "n")
    poll("accepted", 5000, accepted, ask)
  end)
end

vim.defer_fn(function() finish("driver timeout") end, cfg.timeout_ms or 60000)
vim.cmd("filetype on") -- -u NONE leaves it off
longllama.setup({ cmd = cfg.cmd, settings = cfg.settings, inline = cfg.inline })
vim.cmd("edit " .. vim.fn.fnameescape(cfg.file))
poll("attached", 30000, function()
  local client = longllama.client(0)
  return client and vim.lsp.buf_is_attached(0, client.id) and client.initialized ~= false
    and client.server_capabilities ~= nil
end, function()
  result.nvim = tostring(vim.version().major) .. "." .. vim.version().minor
  result.mode = (cfg.inline and vim.lsp.inline_completion) and "inline" or "menu"
  vim.api.nvim_win_set_cursor(0, { cfg.line, 0 })
  cfg.before = vim.api.nvim_get_current_line()
  if result.mode == "inline" then complete_inline() else complete_menu() end
end)
