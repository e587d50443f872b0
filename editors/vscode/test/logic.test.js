// Unit tests for src/logic.ts (compiled to out/): `npm test`, no VS Code needed.
const test = require('node:test');
const assert = require('node:assert/strict');
const { serverSettings, formatAnswer, statusText, CLIENT_KEYS } = require('../out/logic.js');
const pkg = require('../package.json');

const keys = Object.keys(pkg.contributes.configuration.properties).map((k) => k.slice('longllama.'.length));

test('settings map to the nested initializationOptions tree, without client keys', () => {
  const values = { 'completion.maxTokens': 64, 'model.path': '', 'memory.enabled': false, 'server.path': '/x' };
  const tree = serverSettings(keys, (k) => (k in values ? values[k] : undefined));
  assert.deepEqual(tree, { completion: { maxTokens: 64 }, model: { path: null }, memory: { enabled: false } });
});

test('every client key is contributed, defaults reproduce the server defaults', () => {
  for (const key of CLIENT_KEYS) assert.ok(keys.includes(key), key);
  const defaults = (k) => pkg.contributes.configuration.properties[`longllama.${k}`].default;
  const tree = serverSettings(keys, defaults);
  assert.equal(tree.completion.maxTokens, 48);
  assert.equal(tree.logLevel, 'info');
  assert.equal(tree.server, undefined);
});

test('answers list their sources as links, highest weight first as sent', () => {
  const md = formatAnswer('What is greet?', {
    answer: 'It prints hello.\n',
    sources: [
      { path: 'greet.py', startLine: 4, endLine: 6, weight: 0.5, symbol: 'greet', uri: 'file:///r/greet.py' },
      { path: 'main.py', startLine: 1, endLine: 2, weight: 0.125, symbol: null, uri: null },
    ],
    timings: { total: 1234 },
  });
  assert.match(md, /^# What is greet\?\n\nIt prints hello\.\n/);
  assert.match(md, /- \[greet\.py:4-6\]\(file:\/\/\/r\/greet\.py#L4\) `greet` \(50\.0%\)/);
  assert.match(md, /- `main\.py:1-2` \(12\.5%\)/);
  assert.match(md, /_1\.2 s_/);
  assert.match(formatAnswer('q', { answer: ' ', sources: [] }), /_\(empty answer\)_/);
});

test('status text follows the server: stopped, loading, indexing, ready, error', () => {
  const ready = { model: 'smol', engine: 'ready', device: 'cpu', indexing: 'watching', files: 1200, chunks: 9000,
    memoryTokens: 65536 };
  assert.match(statusText(false).text, /circle-slash/);
  assert.match(statusText(true).text, /loading~spin/);
  assert.match(statusText(true, { ...ready, engine: 'loading' }).tooltip, /loading the model smol/);
  const indexing = statusText(true, ready, { title: 'LongLLaMA: indexing', message: '3/10 a.py', percentage: 30 });
  assert.equal(indexing.text, '$(sync~spin) LongLLaMA 30%');
  assert.equal(indexing.tooltip, 'LongLLaMA: indexing: 3/10 a.py');
  assert.equal(statusText(true, ready).text, '$(check) LongLLaMA 1.2k files');
  assert.match(statusText(true, ready).tooltip, /smol on cpu\nindexing: watching\n1200 files, 9000 chunks, 65\.5k/);
  assert.equal(statusText(true, { ...ready, files: 0 }).text, '$(check) LongLLaMA');
  assert.equal(statusText(true, { ...ready, files: 1 }).text, '$(check) LongLLaMA 1 file');
  assert.match(statusText(true, { ...ready, engine: 'error', error: 'no model' }).tooltip, /no model/);
});
