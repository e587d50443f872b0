-- longllama.nvim: start longllama-lsp, pass initializationOptions, map keys; all logic lives in the server.
-- Neovim 0.11+: vim.lsp.config/enable; 0.8-0.10: vim.lsp.start; 0.7: vim.lsp.start_client.
-- Ghost text with vim.lsp.inline_completion (0.12+), else the completion menu (vim.lsp.completion
-- on 0.11, omnifunc <C-x><C-o> before). Messages: longllama_lsp/protocol.py. Docs: editors/README.md.
local M = {}

local NAME = "longllama"

M.defaults = {
  cmd = { "longllama-lsp" },
  filetypes = { "python", "javascript", "javascriptreact", "typescript", "typescriptreact",
                "go", "rust", "java", "c", "cpp" },
  root_markers = { ".git" },
  settings = {},      -- the server's settings tree (initializationOptions), see editors/README.md
  inline = true,      -- ghost text where Neovim has vim.lsp.inline_completion (0.12+)
  autotrigger = false, -- open the completion menu as you type (0.11 vim.lsp.completion)
  accept_key = "<Tab>", -- accepts the ghost text (falls through when there is none); false: no mapping
}
M.config = vim.deepcopy(M.defaults)

local function has(version)
  return vim.fn.has("nvim-" .. version) == 1
end

-- client:request(...) from 0.11 on, client.request(...) before; `kind` is "request" or "notify".
local function rpc(client, kind, ...)
  if has("0.11") then
    return client[kind](client, ...)
  end
  return client[kind](...)
end

local function notify(msg, level)
  vim.notify("longllama: " .. msg, level or vim.log.levels.INFO)
end

--- The longllama client attached to `bufnr`, else any running one.
function M.client(bufnr)
  local all = has("0.10") and vim.lsp.get_clients() or vim.lsp.get_active_clients()
  local fallback
  for _, c in pairs(all) do
    if c.name == NAME then
      if vim.lsp.buf_is_attached(bufnr or 0, c.id) then
        return c
      end
      fallback = fallback or c
    end
  end
  return fallback
end

local function on_attach(client, bufnr)
  if M.config.inline and vim.lsp.inline_completion then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
    local accept = M.config.accept_key
    if accept then -- accept the ghost text, else insert the key itself
      vim.keymap.set("i", accept, function() return not vim.lsp.inline_completion.get() and accept or "" end,
                     { buffer = bufnr, expr = true, desc = "LongLLaMA: accept the completion" })
    end
  elseif vim.lsp.completion and vim.lsp.completion.enable then
    vim.lsp.completion.enable(true, client.id, bufnr, { autotrigger = M.config.autotrigger })
  else
    vim.api.nvim_buf_set_option(bufnr, "omnifunc", "v:lua.vim.lsp.omnifunc")
  end
end

local function root_dir(bufnr)
  local dir = vim.fn.fnamemodify(vim.api.nvim_buf_get_name(bufnr), ":p:h")
  for _, marker in ipairs(M.config.root_markers) do
    local found = vim.fn.finddir(marker, dir .. ";")
    if found == "" then
      found = vim.fn.findfile(marker, dir .. ";")
    end
    if found ~= "" then
      return vim.fn.fnamemodify(vim.fn.fnamemodify(found, ":p"):gsub("/$", ""), ":h")
    end
  end
  return dir
end

local function client_config()
  local c = M.config
  return { name = NAME, cmd = c.cmd, init_options = c.settings, on_attach = on_attach, filetypes = c.filetypes,
           root_dir = function(bufnr, on_dir) on_dir(root_dir(bufnr)) end } -- 0.11 form; start() replaces it
end

local function start(bufnr)
  if vim.api.nvim_buf_get_option(bufnr, "buftype") ~= "" then
    return
  end
  local config = client_config()
  config.root_dir = root_dir(bufnr)
  if has("0.8") then
    vim.lsp.start(config, { bufnr = bufnr })
    return
  end
  local client = M.client(bufnr)
  local id = client and client.id or vim.lsp.start_client(config)
  if id then
    vim.lsp.buf_attach_client(bufnr, id)
  end
end

--- Formats an answer and its sources as markdown lines.
function M.answer_lines(question, result)
  local lines = { "# " .. question, "" }
  vim.list_extend(lines, vim.split(result.answer or "", "\n", { plain = true }))
  if result.sources and #result.sources > 0 then
    vim.list_extend(lines, { "", "## Sources", "" })
    for _, s in ipairs(result.sources) do
      local symbol = s.symbol ~= vim.NIL and s.symbol and ("  " .. s.symbol) or ""
      lines[#lines + 1] = ("- %s:%d-%d%s  (%.1f%%)"):format(s.path, s.startLine, s.endLine, symbol, 100 * s.weight)
    end
  end
  return lines
end

local function show_answer(question, result)
  vim.cmd("botright new")
  local buf = vim.api.nvim_get_current_buf()
  for option, value in pairs({ buftype = "nofile", bufhidden = "wipe", swapfile = false, filetype = "markdown" }) do
    vim.api.nvim_buf_set_option(buf, option, value)
  end
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, M.answer_lines(question, result))
  vim.b[buf].longllama_answer = result
  local items = {}
  for _, s in ipairs(result.sources or {}) do
    if s.uri and s.uri ~= vim.NIL then
      local text = s.symbol ~= vim.NIL and s.symbol or s.path
      items[#items + 1] = { filename = vim.uri_to_fname(s.uri), lnum = s.startLine, text = text }
    end
  end
  vim.fn.setqflist({}, " ", { title = "LongLLaMA sources", items = items }) -- :copen to jump to them
end

-- Sends `method` to the server of the current buffer and calls on_result(result) unless it fails.
local function call(method, params, on_result)
  local bufnr = vim.api.nvim_get_current_buf()
  local client = M.client(bufnr)
  if not client then
    return notify("no server is running (open a file of a configured filetype)", vim.log.levels.WARN)
  end
  if params and params.textDocument then -- `true`: the current buffer, when the server has it
    params.textDocument = vim.lsp.buf_is_attached(bufnr, client.id) and { uri = vim.uri_from_bufnr(bufnr) } or nil
  end
  rpc(client, "request", method, params, function(err, result)
    if err then
      return notify(err.message, vim.log.levels.ERROR)
    end
    on_result(result)
  end, bufnr)
end

--- Asks about the repository: the answer opens in a scratch buffer, its sources in the quickfix list.
function M.ask(question)
  question = (question and question ~= "") and question or vim.fn.input("Ask LongLLaMA: ")
  if question ~= "" then
    call("longllama/ask", { question = question, textDocument = true }, function(r) show_answer(question, r) end)
  end
end

function M.reindex()
  call("workspace/executeCommand", { command = "longllama.reindex" }, function(r)
    notify(r.started and ("reindexing " .. table.concat(r.roots, ", "))
           or "not reindexing: indexing is off or the model is not loaded")
  end)
end

function M.status()
  call("longllama/status", nil, function(s)
    notify(("%s on %s, model %s; indexing %s: %d files, %d chunks, %d memory tokens"):format(
      s.engine, tostring(s.device), s.model, s.indexing, s.files, s.chunks, s.memoryTokens))
  end)
end

--- Changes settings at run time (sent as workspace/didChangeConfiguration).
function M.update(settings)
  M.config.settings = vim.tbl_deep_extend("force", M.config.settings, settings)
  local client = M.client(0)
  if client then
    rpc(client, "notify", "workspace/didChangeConfiguration", { settings = { longllama = M.config.settings } })
  end
end

function M.setup(opts)
  M.config = vim.tbl_extend("force", vim.deepcopy(M.defaults), opts or {}) -- lists (cmd, filetypes) replace
  local cmd = vim.api.nvim_create_user_command
  cmd("LongllamaAsk", function(a) M.ask(a.args) end, { nargs = "*", desc = "Ask LongLLaMA about this repository" })
  cmd("LongllamaReindex", M.reindex, { desc = "Reindex the workspace" })
  cmd("LongllamaStatus", M.status, { desc = "Show the LongLLaMA server status" })
  if has("0.11") then
    vim.lsp.config(NAME, client_config())
    vim.lsp.enable(NAME)
    return
  end
  local group = vim.api.nvim_create_augroup(NAME, { clear = true })
  vim.api.nvim_create_autocmd("FileType", { group = group, pattern = M.config.filetypes,
                                            callback = function(args) start(args.buf) end })
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do -- buffers opened before setup()
    if vim.tbl_contains(M.config.filetypes, vim.api.nvim_buf_get_option(buf, "filetype")) then start(buf) end
  end
end

return M
