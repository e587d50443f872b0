// LongLLaMA for VS Code: starts longllama-lsp over stdio, passes settings, shows status; all logic lives
// in the server. Inline completions come from vscode-languageclient's inline completion feature.
// Messages: longllama_lsp/protocol.py. Docs: editors/README.md.
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  State,
} from 'vscode-languageclient/node';
import { AskResult, Progress, Status, formatAnswer, serverSettings, statusText } from './logic';

const SECTION = 'longllama';
const ANSWER_SCHEME = 'longllama-answer';

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
let settingKeys: string[] = [];
let status: Status | undefined;
let progress: Progress | undefined;
let poll: NodeJS.Timeout | undefined;
const answers = new Map<string, string>();

const config = () => vscode.workspace.getConfiguration(SECTION);
const settings = () => serverSettings(settingKeys, (key) => config().get(key));
const running = () => client?.state === State.Running;

function render(): void {
  const { text, tooltip } = statusText(running(), status, progress);
  statusItem.text = text;
  statusItem.tooltip = tooltip;
}

async function refreshStatus(): Promise<void> {
  clearTimeout(poll);
  status = running() ? await client!.sendRequest<Status>('longllama/status').catch(() => undefined) : undefined;
  render();
  const busy = status && (status.engine === 'loading' || ['waiting', 'indexing'].includes(status.indexing));
  if (busy) poll = setTimeout(() => void refreshStatus(), 2000);
}

function createClient(): LanguageClient {
  const c = config();
  const options: LanguageClientOptions = {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: settings,
    outputChannel: output,
    middleware: {
      // Ghost text is the default; the suggest widget would run the model again on every keystroke.
      provideCompletionItem: (document, position, context, token, next) =>
        config().get<boolean>('completionMenu') ? next(document, position, context, token) : undefined,
      handleWorkDoneProgress: (token, params, next) => {
        progress = params.kind === 'end' ? undefined : { ...progress, ...params };
        if (params.kind === 'end') void refreshStatus();
        render();
        next(token, params);
      },
    },
  };
  const command = c.get<string>('server.path') || 'longllama-lsp';
  return new LanguageClient(SECTION, 'LongLLaMA', { command, args: c.get<string[]>('server.args') ?? [] }, options);
}

async function start(): Promise<void> {
  const old = client;
  client = undefined;
  await old?.stop().catch(() => undefined);
  progress = undefined;
  client = createClient();
  client.onDidChangeState(() => void refreshStatus());
  render();
  try {
    await client.start();
  } catch (err) {
    output.error(`could not start the server: ${err}`);
    const pick = await vscode.window.showErrorMessage(
      `LongLLaMA: could not start "${config().get('server.path')}" (${err}). Is longllama-lsp installed?`,
      'Open settings');
    if (pick) void vscode.commands.executeCommand('workbench.action.openSettings', 'longllama.server.path');
  }
  await refreshStatus();
}

async function ask(): Promise<void> {
  if (!running()) return void vscode.window.showWarningMessage('LongLLaMA: the server is not running.');
  const question = await vscode.window.showInputBox({
    title: 'LongLLaMA: Ask about this repository', prompt: 'Answered from the repository memory', ignoreFocusOut: true,
  });
  if (!question?.trim()) return;
  const doc = vscode.window.activeTextEditor?.document;
  const synced = doc && ['file', 'untitled'].includes(doc.uri.scheme);
  const params = { question, textDocument: synced ? { uri: client!.code2ProtocolConverter.asUri(doc.uri) } : undefined };
  try {
    const result = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: 'LongLLaMA is thinking…', cancellable: true },
      (_, token) => client!.sendRequest<AskResult>('longllama/ask', params, token));
    if (!result) return;
    const uri = vscode.Uri.from({ scheme: ANSWER_SCHEME, path: `/answer-${answers.size + 1}.md` });
    answers.set(uri.path, formatAnswer(question, result));
    const answer = await vscode.workspace.openTextDocument(uri);
    await vscode.window.showTextDocument(answer, { viewColumn: vscode.ViewColumn.Beside, preview: true });
  } catch (err) {
    void vscode.window.showErrorMessage(`LongLLaMA: ${err instanceof Error ? err.message : err}`);
  }
}

async function reindex(): Promise<void> {
  if (!running()) return void vscode.window.showWarningMessage('LongLLaMA: the server is not running.');
  const result = await client!.sendRequest(ExecuteCommandRequest.type, { command: 'longllama.reindex', arguments: [] });
  const message = result?.started
    ? `reindexing ${result.roots.join(', ')}` : 'not reindexing: indexing is off or the model is not loaded';
  void vscode.window.showInformationMessage(`LongLLaMA: ${message}`);
  await refreshStatus();
}

function onConfigurationChanged(event: vscode.ConfigurationChangeEvent): void {
  if (!event.affectsConfiguration(SECTION)) return;
  // The server reads the model settings once, at start.
  if (['server', 'model'].some((s) => event.affectsConfiguration(`${SECTION}.${s}`))) return void start();
  if (running()) void client!.sendNotification(DidChangeConfigurationNotification.type, { settings: settings() });
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  settingKeys = Object.keys(context.extension.packageJSON.contributes.configuration.properties)
    .map((key) => key.slice(SECTION.length + 1));
  output = vscode.window.createOutputChannel('LongLLaMA', { log: true });
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = 'longllama.showOutput';
  statusItem.show();
  context.subscriptions.push(
    output,
    statusItem,
    vscode.workspace.registerTextDocumentContentProvider(ANSWER_SCHEME, {
      provideTextDocumentContent: (uri) => answers.get(uri.path) ?? '',
    }),
    vscode.commands.registerCommand('longllama.askRepository', ask),
    vscode.commands.registerCommand('longllama.reindexWorkspace', reindex),
    vscode.commands.registerCommand('longllama.restartServer', start),
    vscode.commands.registerCommand('longllama.showOutput', () => output.show()),
    vscode.workspace.onDidChangeConfiguration(onConfigurationChanged),
  );
  await start();
}

export async function deactivate(): Promise<void> {
  clearTimeout(poll);
  await client?.stop();
}
