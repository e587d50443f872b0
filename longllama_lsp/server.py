"""longllama-lsp: the language server (pygls 2.x) and its command line.

Handlers only translate (house style 5): LSP types in, a `LongLlamaServer` method (service.py) or
the Engine, LSP types out. Methods: textDocument/inlineCompletion (InlineCompletionOptions),
textDocument/completion, longllama/ask, longllama/status, workspace/executeCommand
(longllama.ask, longllama.reindex), didChangeConfiguration; see protocol.py for the custom ones.
The JSON-RPC fixes over pygls are in rpc.py.

    longllama-lsp                                   stdio (nothing but protocol on stdout)
    longllama-lsp --tcp [--host 127.0.0.1] --port N [--token-file F] [--allow-root DIR ...]
    longllama-lsp --tcp --host 0.0.0.0 --allow-remote
    longllama serve --http [--port 8087] [--repo DIR]  an OpenAI-compatible API (http_api.py)

Over TCP every connection is its own LSP session (documents, initialize/shutdown), and all of them
share one engine (the model is loaded once) and one indexer per workspace root
(shared.SharedServices, tcp.serve_tcp). A client must send the server's token in
initializationOptions.token: $LONGLLAMA_TOKEN, else the 0600 file given with --token-file, else a
fresh one, published with the port in this user's server record (auth.py; `longllama servers`
shows it). Never on the command line: `ps` shows argv to every user. Workspace folders the server's
user does not own are refused unless given with --allow-root. Limits: tcp.TcpLimits. The process
serves until it is stopped.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from .auth import TOKEN_ENV, AuthError, ServerRecord, publish, server_token, unpublish
from .cli import Command, add_model_arguments, add_repository_argument, add_version_argument, shown_lines
from .documents import Document
from .engine import Completion
from .logs import RedactingFormatter, setup_logging
from .prompt import word_before
from .protocol import (
    ASK,
    COMMAND_ASK,
    COMMAND_REINDEX,
    STATUS,
    AskParams,
    AskResult,
    ReindexResult,
    StatusParams,
    StatusResult,
)
from .service import LongLlamaServer
from .settings import ModelSettings
from .shared import EngineFactory, SharedServices
from .tcp import TcpLimits, serve_tcp
from .workspace import RepositoryFactory, open_indexer

__all__ = ["RedactingFormatter", "add_arguments", "build_server", "check_listen_address", "main", "run"]

logger = logging.getLogger(__name__)

TCP_PORT, HTTP_PORT = 2087, 8087  # default ports of --tcp and --http

# -- handlers (translate only) ---------------------------------------------------------------------------

def build_server(engine_factory: EngineFactory | None = None, repository_factory: RepositoryFactory | None = None,
                 model_overrides: ModelSettings | None = None, shared: SharedServices | None = None) -> LongLlamaServer:
    """One session; pass `shared` to bind it to a process's engine and indexers (TCP: one per connection)."""
    server = LongLlamaServer(engine_factory, repository_factory, model_overrides, shared=shared)

    @server.feature(types.INITIALIZE)
    def initialize(ls: LongLlamaServer, params: types.InitializeParams) -> None:
        ls.on_initialize(params)

    @server.feature(types.INITIALIZED)
    async def initialized(ls: LongLlamaServer, params: types.InitializedParams) -> None:
        await ls.on_initialized()

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: LongLlamaServer, *args: Any) -> None:
        ls.shutdown_all()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: LongLlamaServer, params: types.DidChangeConfigurationParams) -> None:
        ls.update_settings(params.settings)

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: LongLlamaServer, params: types.DidOpenTextDocumentParams) -> None:
        ls.touch(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: LongLlamaServer, params: types.DidChangeTextDocumentParams) -> None:
        ls.document_changed(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_SAVE)
    def did_save(ls: LongLlamaServer, params: types.DidSaveTextDocumentParams) -> None:
        logger.debug("saved %s", params.text_document.uri)  # the indexers' watchers pick the file up

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: LongLlamaServer, params: types.InlineCompletionParams):
        automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
        done, _ = await ls.complete(params.text_document.uri, params.position, automatic, sources=False)
        if done is None or not done.text:
            return types.InlineCompletionList(items=[])
        at = types.Range(start=params.position, end=params.position)
        return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=done.text, range=at)])

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "("]))
    async def completion(ls: LongLlamaServer, params: types.CompletionParams):
        kind = params.context.trigger_kind if params.context else types.CompletionTriggerKind.Invoked
        done, doc = await ls.complete(params.text_document.uri, params.position,
                                      kind != types.CompletionTriggerKind.Invoked)
        if done is None or not done.text:
            return types.CompletionList(is_incomplete=True, items=[])
        return types.CompletionList(is_incomplete=True, items=[
            completion_item(doc, params.position, done, ls.position_encoding)])

    @server.feature(ASK)
    async def ask(ls: LongLlamaServer, params: AskParams) -> AskResult:
        uri = params.text_document.uri if params.text_document else None
        return await ls.ask(params.question, uri, params.max_tokens)

    @server.feature(STATUS)
    def status(ls: LongLlamaServer, params: StatusParams | None) -> StatusResult:
        return ls.status()

    @server.command(COMMAND_ASK)
    async def ask_command(ls: LongLlamaServer, *args: Any) -> AskResult:
        if not args or not isinstance(args[0], str) or (len(args) > 1 and not isinstance(args[1], str)):
            raise JsonRpcInvalidParams("longllama.ask takes [question] or [question, uri]")
        return await ls.ask(args[0], args[1] if len(args) > 1 else None)

    @server.command(COMMAND_REINDEX)
    def reindex_command(ls: LongLlamaServer, *args: Any) -> ReindexResult:
        return ls.reindex()

    return server


def completion_item(doc: Document, position: types.Position, done: Completion, encoding: str) -> types.CompletionItem:
    """A completion as an item whose edit replaces the word before the cursor with word + completion."""
    offset = doc.offset_at(position, encoding)
    line_start = doc.text.rfind("\n", 0, offset) + 1
    word = word_before(doc.text[line_start:offset])
    start = doc.position_at(offset - len(word), encoding)
    new_text = word + done.text
    first = new_text.strip().splitlines()[0] if new_text.strip() else new_text
    label = first if len(first) <= 60 else first[:59] + "…"
    sources = "\n".join(f"{s.location} ({s.weight:.1%})" for s in done.sources)
    return types.CompletionItem(
        label=label, kind=types.CompletionItemKind.Text, detail="LongLLaMA", preselect=True, sort_text="0",
        filter_text=new_text, insert_text=new_text, insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(range=types.Range(start=start, end=position), new_text=new_text),
        documentation=types.MarkupContent(kind=types.MarkupKind.PlainText,
                                          value=done.text + (f"\n\nSources:\n{sources}" if sources else "")))


# -- command line -----------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tcp", action="store_true", help="listen on TCP instead of stdio (many clients, one model)")
    p.add_argument("--http", action="store_true", help="serve an OpenAI-compatible API instead of LSP: "
                   "/v1/completions (prompt + suffix), /v1/chat/completions (streaming), /v1/models, with --repo "
                   "in memory; clients send 'Authorization: Bearer TOKEN' (see --token-file)")
    p.add_argument("--host", default="127.0.0.1", help="TCP address (default 127.0.0.1; others need "
                   "--allow-remote)")
    p.add_argument("--port", type=int, default=None, help=f"TCP port (default {TCP_PORT}; --http: {HTTP_PORT}; "
                   "0: any free port)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--token-file", metavar="PATH", help="the token clients must send (--tcp: "
                   "initializationOptions.token; --http: Authorization: Bearer), read from this file (yours, mode "
                   f"0600). Default: ${TOKEN_ENV}, else a fresh token published in your server record "
                   "(`longllama servers` shows it)")
    p.add_argument("--token", help=argparse.SUPPRESS)  # gone: refused with a message (run)
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="TCP: also index this folder (and folders under it) for clients, though the server's "
                   "user does not own it (repeatable; by default only your own folders)")
    p.add_argument("--idle-timeout", type=float, default=TcpLimits.idle_s, metavar="S",
                   help=f"TCP: close a session after S seconds without a message (default {TcpLimits.idle_s:.0f})")
    p.add_argument("--log-file", metavar="PATH", help="log here instead of stderr")
    p.add_argument("--no-index", action="store_true", help="do not index the workspace (memory = open buffer only)")
    http = p.add_argument_group("--http", "The token comes from $LONGLLAMA_TOKEN, else --token-file, else it is "
                                "made fresh and written to a private server record (its path is printed).")
    add_repository_argument(http, "--http: the repository whose memory answers requests", default=None)
    http.add_argument("--print-token", action="store_true", help="--http: print a generated token to stderr once")
    # Tests (tests/test_editors.py, test_server.py) swap in a fake indexer: MODULE:FUNC(root, engine, budget_tokens).
    p.add_argument("--indexer-factory", metavar="MODULE:FUNC", help=argparse.SUPPRESS)
    add_model_arguments(p, decoding=True)


def check_listen_address(args: argparse.Namespace) -> str | None:
    """Why the TCP address is refused, or None (the token: token_refusal)."""
    if not (args.tcp or getattr(args, "http", False)):
        return None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    if not args.allow_remote:
        return f"--host {args.host} is not a loopback address: add --allow-remote to listen on it (clients " \
               f"send the token; TLS is not provided, so only on a trusted network)"
    return None


def run(args: argparse.Namespace) -> int:
    refusal = check_listen_address(args) or token_refusal(args) or http_only_refusal(args)
    if refusal:
        print(f"longllama-lsp: error: {shown_lines(refusal)}", file=sys.stderr)
        return 2
    setup_logging(args.log_file, verbose=getattr(args, "verbose", False))
    repository_factory: RepositoryFactory | None = None if args.no_index else open_indexer
    if args.indexer_factory and not args.no_index:
        module, _, attr = args.indexer_factory.partition(":")
        repository_factory = getattr(importlib.import_module(module), attr)
    if args.http:
        from .http_api import serve_http

        args.port = HTTP_PORT if args.port is None else args.port
        return serve_http(args, repository_factory)
    overrides = ModelSettings(args.model, args.device, args.dtype, args.decode_dtype)
    if args.tcp:
        return run_tcp(args, repository_factory, overrides)
    server = build_server(repository_factory=repository_factory, model_overrides=overrides)
    protocol_out = guard_stdout()
    server.start_io(sys.stdin.buffer, protocol_out)
    return 0


def token_refusal(args: argparse.Namespace) -> str | None:
    if args.token is not None:
        return (f"--token is gone: every local user can read a command line (ps). Put the token in "
                f"${TOKEN_ENV} or in a file only you can read, given with --token-file")
    if args.token_file and not (args.tcp or args.http):
        return "--token-file is for --tcp and --http (stdio needs no token)"
    return None


def http_only_refusal(args: argparse.Namespace) -> str | None:
    """Options of --http given to an LSP server would be ignored: say so instead."""
    if args.http:
        return None
    if args.repo is not None:
        return ("--repo is for --http: a language server indexes the folders its editors open (and "
                "`longllama complete`/`ask` use a --tcp server once an editor has opened the folder)")
    if args.print_token:
        return "--print-token is for --http (`longllama servers` shows a --tcp server's token)"
    return None


def run_tcp(args: argparse.Namespace, repository_factory: RepositoryFactory | None, overrides: ModelSettings) -> int:
    """Serve over TCP with a token; this user's server record says where (and the roots open), until exit."""
    try:
        token, _ = server_token(args.token_file)
    except AuthError as exc:
        print(f"longllama-lsp: error: {shown_lines(str(exc))}", file=sys.stderr)
        return 2
    shared = SharedServices(repository_factory=repository_factory, model_overrides=overrides, multi=True,
                            allowed_roots=args.allow_root)
    port = TCP_PORT if args.port is None else args.port
    record = ServerRecord(pid=os.getpid(), host=args.host, port=port, token=token, protocol="lsp")

    def listening(sockets: list[Any]) -> None:
        record.port = sockets[0].getsockname()[1]
        logger.info("listening on %s; server record %s", ", ".join(str(s.getsockname()) for s in sockets),
                    publish(record))

    def roots_changed(roots: list[Path]) -> None:
        record.roots = [str(r) for r in roots]
        publish(record)

    shared.on_roots_changed = roots_changed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` too removes the record (finally below)
    try:
        serve_tcp(args.host, port, lambda: build_server(shared=shared), shared, token,
                  TcpLimits(idle_s=args.idle_timeout), on_listening=listening)
    finally:
        unpublish(record)
    return 0


def guard_stdout():
    """The real stdout for the protocol only; fd 1 and sys.stdout now lead to stderr (stray prints, C libs)."""
    sys.stdout.flush()
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol_out


cli = Command(add_arguments, run, description=(
    "Run the language server: stdio by default, or --tcp. With --http, serve an OpenAI-compatible API "
    "instead (Continue, llm.nvim and other OpenAI clients; README.md shows their settings)."))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longllama-lsp", description=cli.description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_version_argument(parser)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
