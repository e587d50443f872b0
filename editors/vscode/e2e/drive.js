// Activates the compiled extension (out/extension.js) in Node with a stand-in for the `vscode` module,
// against the real server, for tests/test_editors.py: no VS Code download. Only what the extension and
// vscode-languageclient touch is real here; every other API is a no-op. $LONGLLAMA_DRIVE names a JSON
// file {cmd, settings, file, line, question, out}; the report goes to `out`: {inline, menu, answer, status}.
'use strict';
const fs = require('fs');
const Module = require('module');
const path = require('path');

const cfg = JSON.parse(fs.readFileSync(process.env.LONGLLAMA_DRIVE, 'utf8'));
const report = { steps: [] };
const t0 = Date.now();
const step = (name) => report.steps.push(`${name} ${((Date.now() - t0) / 1000).toFixed(1)}s`);

// Flat VS Code settings, as a user would set them.
const settings = { 'longllama.server.path': cfg.cmd[0], 'longllama.server.args': cfg.cmd.slice(1) };
(function flatten(tree, prefix) {
  for (const [key, value] of Object.entries(tree)) {
    if (value && typeof value === 'object') flatten(value, `${prefix}${key}.`);
    else settings[`longllama.${prefix}${key}`] = value;
  }
})(cfg.settings, '');

function noop(name) { // any API we do not model: callable, constructible, disposable
  const fn = function () { return noop(`${name}()`); };
  return new Proxy(fn, {
    get: (_, p) => (p === 'then' ? undefined : p === Symbol.iterator ? function* () {} : noop(`${name}.${String(p)}`)),
    construct: (_, args) => ({ args }),
  });
}
const partial = (name, real) => new Proxy(real, { get: (t, p) => (p in t ? t[p] : noop(`${name}.${String(p)}`)) });

class Disposable { constructor(f) { this.f = f; } dispose() { if (this.f) this.f(); } static from(...d) { return new Disposable(() => d.forEach((x) => x.dispose())); } }
class EventEmitter { constructor() { this.listeners = []; this.event = (l) => { this.listeners.push(l); return new Disposable(); }; } fire(e) { this.listeners.forEach((l) => l(e)); } dispose() {} }
class Position { constructor(line, character) { this.line = line; this.character = character; } }
class Range {
  constructor(a, b, c, d) { [this.start, this.end] = typeof a === 'number' ? [new Position(a, b), new Position(c, d)] : [a, b]; }
}
class Uri {
  constructor(scheme, p) { Object.assign(this, { scheme, path: p, fsPath: p, authority: '', query: '', fragment: '' }); }
  static file(p) { return new Uri('file', p); }
  static parse(s) { const m = /^([\w+.-]+):(?:\/\/[^/]*)?(.*)$/.exec(s); return new Uri(m[1], decodeURIComponent(m[2])); }
  static from(c) { return new Uri(c.scheme, c.path); }
  with() { return this; }
  toString() { return `${this.scheme}://${this.path}`; }
  toJSON() { return this.toString(); }
}
class InlineCompletionItem { constructor(insertText, range, command) { Object.assign(this, { insertText, range, command }); } }
class InlineCompletionList { constructor(items) { this.items = items; } }

const text = fs.readFileSync(cfg.file, 'utf8');
const lines = text.split('\n');
const document = {
  uri: Uri.file(cfg.file), fileName: cfg.file, languageId: 'python', version: 1, isClosed: false, isUntitled: false,
  lineCount: lines.length, eol: 1, getText: () => text,
  offsetAt: (p) => lines.slice(0, p.line).reduce((n, l) => n + l.length + 1, 0) + p.character,
};
const root = { uri: Uri.file(path.dirname(cfg.file)), name: 'repo', index: 0 };
const captured = { commands: {}, contents: {}, shown: [], messages: [] };
const say = (kind) => async (message) => { captured.messages.push(`${kind}: ${message}`); };
const logger = (name) => partial(name, { name, appendLine() {}, append() {}, info() {}, warn() {}, error() {}, debug() {}, trace() {}, show() {}, dispose() {} });

function statusItem() { // remembers every text it showed
  const item = { shown: [], show() {}, hide() {}, dispose() {} };
  Object.defineProperty(item, 'text', { get() { return this.shown[this.shown.length - 1]; }, set(v) { this.shown.push(v); } });
  return item;
}
async function until(what, check, ms) {
  for (const deadline = Date.now() + ms; !check(); await new Promise((r) => setTimeout(r, 50))) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
  }
  step(what);
}

const vscode = partial('vscode', {
  Disposable, EventEmitter, Position, Range, Uri, InlineCompletionItem, InlineCompletionList, version: '1.95.0',
  StatusBarAlignment: { Left: 1, Right: 2 }, ViewColumn: { Beside: -2 }, ProgressLocation: { Notification: 15 },
  InlineCompletionTriggerKind: { Invoke: 0, Automatic: 1 }, CompletionTriggerKind: { Invoke: 0, TriggerCharacter: 1 },
  env: partial('env', { language: 'en', appName: 'drive' }),
  workspace: partial('workspace', {
    workspaceFolders: [root], textDocuments: [document], getWorkspaceFolder: () => root,
    getConfiguration: (section) => ({ get: (k, d) => settings[section ? `${section}.${k}` : k] ?? d, has: () => false, inspect: () => undefined }),
    registerTextDocumentContentProvider: (scheme, provider) => { captured.contents[scheme] = provider; return new Disposable(); },
    openTextDocument: async (uri) => ({ uri, getText: () => captured.contents[uri.scheme].provideTextDocumentContent(uri) }),
  }),
  languages: partial('languages', {
    match: () => 10,
    registerInlineCompletionItemProvider: (_, provider) => { captured.inline = provider; return new Disposable(); },
    registerCompletionItemProvider: (_, provider) => { captured.completion = provider; return new Disposable(); },
  }),
  window: partial('window', {
    activeTextEditor: { document },
    createOutputChannel: logger,
    createStatusBarItem: () => (captured.status = statusItem()),
    showInputBox: async () => cfg.question,
    withProgress: async (_, task) => task({ report() {} }, { isCancellationRequested: false, onCancellationRequested: () => new Disposable() }),
    showTextDocument: async (d) => { captured.shown.push(d); },
    showErrorMessage: say('error'), showWarningMessage: say('warning'), showInformationMessage: say('info'),
  }),
  commands: partial('commands', {
    registerCommand: (id, fn) => { captured.commands[id] = fn; return new Disposable(); },
    executeCommand: async () => undefined,
  }),
});
const load = Module._load;
Module._load = function (request, ...rest) { return request === 'vscode' ? vscode : load.call(this, request, ...rest); };

async function main() {
  const extension = require(path.join(__dirname, '..', 'out', 'extension.js'));
  const packageJSON = require(path.join(__dirname, '..', 'package.json'));
  await extension.activate({ subscriptions: [], extension: { packageJSON } });
  step('activated');
  const token = { isCancellationRequested: false, onCancellationRequested: () => new Disposable() };
  const at = new Position(cfg.line - 1, lines[cfg.line - 1].length);
  const inline = await captured.inline.provideInlineCompletionItems(document, at, { triggerKind: 0 }, token);
  report.inline = (inline.items ?? inline).map((item) => ({ insertText: item.insertText, range: item.range }));
  step('inline completion');
  await until('indexed', () => / files?$/.test(captured.status.text), 30000);
  report.menu = (await captured.completion.provideCompletionItems(document, at, { triggerKind: 0 }, token)) ?? null;
  await captured.commands['longllama.askRepository']();
  report.answer = captured.shown.length ? captured.shown[0].getText() : null;
  step('answer');
  await captured.commands['longllama.reindexWorkspace']();
  report.status = { shown: [...new Set(captured.status.shown)], tooltip: captured.status.tooltip };
  report.messages = captured.messages;
  await extension.deactivate();
  step('stopped');
}

const timer = setTimeout(() => finish('driver timeout'), cfg.timeout_ms ?? 60000);
function finish(error) {
  clearTimeout(timer);
  report.error = error ?? null;
  fs.writeFileSync(cfg.out, JSON.stringify(report));
  process.exit(0);
}
main().then(() => finish(), (err) => finish(String(err && err.stack ? err.stack : err)));
