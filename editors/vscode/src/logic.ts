// The extension's own logic, free of `vscode` imports so `node --test` checks it without VS Code.
// Wire types mirror longllama_lsp/protocol.py (camelCase).

/** Keys under `longllama.` that configure this client, not the server. */
export const CLIENT_KEYS = ['server.path', 'server.args', 'completionMenu', 'trace.server'];

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface Source {
  path: string;
  startLine: number;
  endLine: number;
  weight: number;
  symbol?: string | null;
  uri?: string | null;
}

export interface AskResult {
  answer: string;
  sources: Source[];
  stopReason?: string;
  timings?: Record<string, number>;
}

export interface Status {
  model: string;
  engine: string; // loading | ready | error
  device?: string | null;
  indexing: string; // off | waiting | indexing | watching | idle | error
  files: number;
  chunks: number;
  memoryTokens: number;
  error?: string | null;
}

export interface Progress {
  title?: string;
  message?: string;
  percentage?: number;
}

/** The server's settings tree (initializationOptions) from the flat keys under `longllama.`. */
export function serverSettings(keys: string[], get: (key: string) => unknown): { [key: string]: Json } {
  const tree: { [key: string]: any } = {};
  for (const key of keys) {
    if (CLIENT_KEYS.includes(key)) continue;
    let value = get(key);
    if (value === undefined) continue;
    if (value === '') value = null; // an emptied text box means "the server's default"
    const parts = key.split('.');
    let node = tree;
    for (const part of parts.slice(0, -1)) node = node[part] ??= {};
    node[parts[parts.length - 1]] = value as Json;
  }
  return tree;
}

/** A markdown document: the question, the answer, and links to the sources. */
export function formatAnswer(question: string, result: AskResult): string {
  const lines = [`# ${question}`, '', result.answer.trim() || '_(empty answer)_'];
  if (result.sources.length > 0) {
    lines.push('', '## Sources', '');
    for (const s of result.sources) {
      const where = `${s.path}:${s.startLine}-${s.endLine}`;
      const link = s.uri ? `[${where}](${s.uri}#L${s.startLine})` : `\`${where}\``;
      const symbol = s.symbol ? ` \`${s.symbol}\`` : '';
      lines.push(`- ${link}${symbol} (${(100 * s.weight).toFixed(1)}%)`);
    }
  }
  if (result.timings?.total) lines.push('', `_${(result.timings.total / 1000).toFixed(1)} s_`);
  return lines.join('\n') + '\n';
}

export function formatCount(n: number): string {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : `${n}`;
}

/** Status-bar text and tooltip from `longllama/status` and the current indexing progress. */
export function statusText(running: boolean, status?: Status, progress?: Progress): { text: string; tooltip: string } {
  if (!running) return { text: '$(circle-slash) LongLLaMA', tooltip: 'LongLLaMA: the server is not running' };
  if (progress) {
    const pct = progress.percentage !== undefined ? ` ${progress.percentage}%` : '';
    const detail = [progress.title ?? 'LongLLaMA', progress.message].filter(Boolean).join(': ');
    return { text: `$(sync~spin) LongLLaMA${pct}`, tooltip: detail };
  }
  if (!status || status.engine === 'loading') {
    const model = status ? ` ${status.model}` : '';
    return { text: '$(loading~spin) LongLLaMA', tooltip: `LongLLaMA: loading the model${model}` };
  }
  if (status.engine === 'error' || status.indexing === 'error') {
    return { text: '$(error) LongLLaMA', tooltip: `LongLLaMA: ${status.error ?? 'error'}` };
  }
  const files = status.files > 0 ? ` ${formatCount(status.files)} file${status.files === 1 ? '' : 's'}` : '';
  const tooltip = [
    `LongLLaMA: ${status.model} on ${status.device ?? '?'}`,
    `indexing: ${status.indexing}`,
    `${status.files} files, ${status.chunks} chunks, ${formatCount(status.memoryTokens)} memory tokens`,
  ].join('\n');
  return { text: `$(check) LongLLaMA${files}`, tooltip };
}
