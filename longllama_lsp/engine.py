"""The engine: completion and answer policy over one worker thread that owns the model.

Callers (LSP handlers, the CLI, the workspace's indexers) submit requests and get a `Request` with a
future back (worker.py: the queue, priorities, newest-wins per document key, cancellation). Two API
levels (house style 4):

    generate(token_ids, memory)                  -> Generation   tokens in, tokens out
    complete(text, offset, path, mode)           -> Completion   a buffer and a cursor in, text out
    answer(question, on_token)                   -> Answer       a question in, streamed text out

Generation is decode.py's loop (prefill in chunks, greedy steps, per-document prefix reuse); this
module decides what to feed it: the prompt (prompt.py; fill-in-the-middle with fim.py when the
tokenizer has FIM tokens), the healed text (indentation or the word being typed), the stop rule, the
memory and the sources.

Fill-in-the-middle: the local context is `<prefix> window <suffix> start of the suffix <middle>`
(fim.py's PSM order). The window is the stride-aligned local window of prompt.py, sized so the
suffix's share of the budget fits beside it; the whole buffer still goes to memory as without FIM.
Prefix reuse across keystrokes keeps the markers and the window up to the edit: everything after
it (the typed tokens, the suffix marker, the suffix, the middle marker) is prefilled again on each
request, because the suffix's states attend to the prefix that changed. `fim_suffix_tokens` caps
that per-keystroke cost; the rest of the suffix is in memory.

Memory for a completion = every repository's bank (read through `repositories`, which the workspace
provides; only the request's `roots` when given: a TCP session reads its own) minus the current
file's (stale) chunks, plus the buffer's own text outside the local window (prompt.py), encoded with
`model.encode_memory` and cached by token hash (assembly.py). With `defer_edits` (the language
server) a completion does not wait for that encoding: edited chunks not cached yet are left out and
encoded after it, in the background (`_encode_deferred_later`). The local window is at most
`window - max_new_tokens` tokens, so generation never hits the local-cache flush (spec §2.3).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .assembly import NOTHING, Assembled, Assembler, Buffer, Definition, Source
from .decode import DecodeOptions, Decoder, Generation
from .decode import ms as _ms
from .errors import LongLlamaError, ModelError
from .fim import FimBudget, FimTokens, detect_fim, fim_prompt
from .lexical import Query

# torch (and transformers) are imported on the worker thread when the model loads, not with this
# module: the language server answers `initialize` without waiting ~10 s for them (issue 4).
from .prompt import (
    Block,
    Prompt,
    StopRule,
    SyntaxBlock,
    build_prompt,
    finish,
    rest_of_line,
    streamable_text,
)
from .repetition import RepetitionGuard
from .repository import MemorySource
from .worker import BACKGROUND, FOREGROUND, AfterIdle, Cancelled, Closed, Request, Worker

if TYPE_CHECKING:
    from .knn import Datastore, Knn, QueryProbe
    from .model.memory import Memory

__all__ = ["Answer", "Cancelled", "Completion", "Engine", "EngineOptions", "Generation", "Request", "Source"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Whitespace tokens token healing redoes on a blank line: code's blank lines and indentation take 1-2
# ("\n\n\n"; "\n" + "\n            ").
HEALED_WHITESPACE_TOKENS = 4
DEFERRED = ("deferred edits",)  # the worker key of the background encodes of Assembler.deferred
WARMING = ("retrieval warm-up",)  # the worker key of the background jobs of Assembler.warm

ASK_SYSTEM = ("You are a coding assistant. The code of the user's repository is in your memory. "
              "Answer the question about it concisely, naming files and functions.")


def ask_prompt_ids(tokenizer: Any, question: str, path: str | None = None,
                   conversation: Sequence[Mapping[str, str]] | None = None,
                   defined: Sequence[Definition] = ()) -> list[int]:
    """`ask`'s prompt: ASK_SYSTEM (+ the conversation's system turns), then the turns, ready for the
    assistant's answer. Training and `longllama eval --task passkey --passkey-prompt ask` build the
    same ids, so the model learns to read memory under the prompt users send. `defined`: where the names
    the question names are defined (Assembler.defined), said after the last question: memory holds code,
    not the paths of its files."""
    user = question if path is None else f"{question}\n\n(The question is about the file {path}.)"
    turns = [{"role": "user", "content": user}] if conversation is None else \
        [dict(m) for m in conversation if m["role"] != "system"]
    if defined and turns and turns[-1]["role"] == "user":
        turns[-1]["content"] += "\n\n(Defined in this repository: " + "; ".join(map(_said, defined)) + ".)"
    system = "\n\n".join([ASK_SYSTEM] + [m["content"] for m in conversation or () if m["role"] == "system"])
    messages = [{"role": "system", "content": system}, *turns]
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    said = "\n".join(f"{'Question' if m['role'] == 'user' else 'Answer'}: {m['content']}" for m in turns)
    return tokenizer(f"{system}\n\n{said}\nAnswer:", add_special_tokens=True)["input_ids"]


def _said(d: Definition) -> str:
    """A definition as a question's prompt says it: `C in pkg/m.py, line 12: `class C(Base):`, members a, b`."""
    line = f": `{d.line}`" if d.line else ""
    members = f", members {', '.join(d.members)}" if d.members else ""
    return f"{d.source.symbol} in {d.source.path}, line {d.source.start_line}{line}{members}"


@dataclass
class Completion:
    text: str
    request_id: int
    sources: list[Source]
    timings: dict[str, float]  # milliseconds: queue, prompt, memory, prefill, decode, total
    stop_reason: str
    mode: str
    prompt_tokens: int = 0
    reused_tokens: int = 0
    memory_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class Answer:
    text: str
    request_id: int
    sources: list[Source]
    timings: dict[str, float]
    stop_reason: str
    memory_tokens: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0


@dataclass
class EngineOptions(DecodeOptions):
    mode: str = "line"
    max_tokens: int = 48  # per completion
    answer_max_tokens: int = 256
    context_tokens: int | None = None  # None: min(window - max_tokens, config.last_context_length)
    memory: bool = True  # repository + rest-of-buffer memory
    # Completions leave out the open file's edited chunks whose memory is not encoded yet and encode them
    # in the background afterwards (Assembler.deferred): a keystroke never waits for them (one waited 4.6 s
    # at 64k memory tokens), the next completion finds them. The language server sets it; a one-shot CLI
    # completion has no next request to pick them up, and answers always encode first.
    defer_edits: bool = False
    # ... and start encoding them only after this long without a completion request: an encode already
    # running is not preempted, so a keystroke right after it waited 0.2-0.6 s in the typing benchmark.
    defer_idle_ms: int = 0
    buffer_memory_tokens: int = 4096  # cap on each side of the cursor (encoded once per block, cached)
    block_cache_tokens: int = 1 << 17  # encoded buffer blocks kept, in tokens
    # Memory tokens each query attends to (the model's config.mem_budget): the top memory blocks by
    # their key summaries; None or 0: all of memory (dense). Setting memory.selectTokens.
    select_tokens: int | None = 2048
    # A completion's memory of other files: only the chunks that best match the code before the cursor,
    # up to this many tokens (lexical.py; 0: every resident chunk); an answer's, those its question names
    # (lexical.Query.question). Setting memory.retrieveTokens.
    retrieve_tokens: int = 4096
    # Each completion and answer step mixes in the kNN lookup over its memory with this weight (knn.py; 0:
    # off). Setting memory.knnWeight; BENCHMARKS.md "Stop 43" (completions) and "Stop 44" (answers).
    knn_weight: float = 0.3
    top_sources: int = 5
    # Completions take their sources from the last prompt token only: sampling generated tokens too
    # made each decode step 1.8x slower (792 vs 440 ms/token, 4k memory tokens, busy 2-core CPU).
    completion_source_steps: int = 0
    # Keys typed along the last suggestion get the rest of it without the model (see typeahead).
    typeahead: bool = True
    # Fill-in-the-middle prompts when the tokenizer has FIM tokens (fim.py); the suffix gets at most
    # this share of the local context (Continue's default) and at most fim_suffix_tokens tokens: they
    # are prefilled again on every keystroke (see the module docstring). SmolLM2-135M, CPU at load 13:
    # a keystroke's prefill took 640 ms with 5 tokens, 1,020 with 69, 2,290 with 133, 4,630 with 261.
    fim: bool = True
    fim_suffix_share: float = FimBudget.max_suffix_share
    fim_suffix_tokens: int = 64
    # Generations caught in a loop end after its first copy (repetition.py; None: off). Code repeats
    # itself legitimately, so completions need 3 copies; an answer's prose loop is often a whole
    # paragraph (an 81-token one in `longllama ask` with SmolLM2), so 2 copies of 64+ tokens end it, and
    # so do 3 long lines that differ only in their numbers (a numbered list repeating one item).
    repetition: RepetitionGuard | None = field(default_factory=RepetitionGuard)
    answer_repetition: RepetitionGuard | None = field(
        default_factory=lambda: RepetitionGuard(min_repeats=2, max_period=160, min_span=64, numbered_repeats=3))


class Engine:
    """Completion and answer policy; the model lives on one worker thread (see the module docstring)."""

    def __init__(self, model: Any = None, tokenizer: Any = None, *,
                 loader: Callable[[], tuple[Any, Any, Path]] | None = None, options: EngineOptions | None = None,
                 name: str = "", model_dir: Path | None = None):
        if model is None and loader is None:
            raise ValueError("Engine needs a model and tokenizer, or a loader")
        self.options = options or EngineOptions()
        # The banks a request reads (the workspace sets its provider); called on the worker per request.
        self.repositories: Callable[[], Sequence[MemorySource]] = tuple
        self.name = name
        self.model_dir = model_dir  # the checkpoint folder (indexes are keyed by its fingerprint)
        self._model, self._tokenizer, self._loader = model, tokenizer, loader
        self._load_error: BaseException | None = None
        self._ready = threading.Event()
        # Per document: (text before the cursor, completion, text after it) of the last completion,
        # so keys typed along the suggestion are answered from it without the model (typeahead).
        self._suggested: OrderedDict[Hashable, tuple[str, str, str]] = OrderedDict()
        self._assembler: Assembler | None = None
        self._decoder: Decoder | None = None
        self._fim: FimTokens | None = None  # the tokenizer's FIM markers, if it has them
        self._knn_probe: QueryProbe | None = None  # hooks on the model, made with the first lookup
        self._knn_last: tuple[weakref.ref[Assembled], Datastore | None] | None = None  # the last memory's datastore
        self.last_timings: dict[str, float] = {}
        self._worker = Worker(self._setup, self._run_request)
        self._worker.start()
        self._typing = AfterIdle(self._queue_deferred)  # deferred edits wait for a pause in completions

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_path: str | os.PathLike | None = None, device: str | None = None,
             dtype: str | None = None, config_value: str | None = None, decode_dtype: str | None = None,
             **kwargs: Any) -> Engine:
        """An engine whose worker loads the model (load.py) before its first request."""
        from .load import load_model_and_tokenizer

        def loader() -> tuple[Any, Any, Path]:
            return load_model_and_tokenizer(model_path, device, dtype, config_value, decode_dtype)
        return cls(loader=loader, name=str(model_path or config_value or ""), **kwargs)

    @property
    def model(self) -> Any:
        self.wait_ready()
        return self._model

    @property
    def tokenizer(self) -> Any:
        self.wait_ready()
        return self._tokenizer

    @property
    def decoder(self) -> Decoder:
        self.wait_ready()
        return self._decoder

    @property
    def state(self) -> str:
        if self._load_error is not None:
            return "error"
        return "ready" if self._ready.is_set() else "loading"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; raises the load error (ModelError) if it failed."""
        if not self._ready.wait(timeout):
            raise TimeoutError("the model is still loading")
        if self._load_error is not None:
            raise self._load_error

    # -- the worker ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        """On the worker, before its first request: load the model (errors reach every request)."""
        if self._model is None:
            try:
                self._model, self._tokenizer, model_dir = self._loader()
                self.model_dir = Path(model_dir)
                self.name = self.name or str(self.model_dir)
            except BaseException as exc:  # noqa: BLE001 - reported through every request instead
                if isinstance(exc, LongLlamaError):  # says what to do; no traceback needed
                    logger.error("loading the model failed: %s", exc)
                else:
                    logger.exception("loading the model failed")
                self._load_error = exc if isinstance(exc, Exception) else ModelError(str(exc))
        if self._model is not None:
            self._model.eval()
            self._assembler = Assembler(self._encode, self._model.device, lambda: self.repositories(),
                                        self.options.block_cache_tokens, dtype=self._model.dtype,
                                        select_tokens=lambda: self._model.config.mem_budget, tokenize=self._chunk_ids,
                                        edited_tokens=2 * self.options.buffer_memory_tokens,
                                        retrieve_tokens=lambda: self.options.retrieve_tokens,
                                        keep_next_ids=self._knn_on)
            self._fim = detect_fim(self._tokenizer, getattr(self._tokenizer, "bos_token_id", None))
            self._decoder = Decoder(self._model, self._tokenizer, lambda: self.options,
                                    stop_ids=self._fim.stop_ids if self._fim else ())
        self._ready.set()
        if self._model is not None:  # what load.resolve_device_dtype chose for an unset device/dtype
            st = self._model_status()
            logger.info("model %s loaded: device %s, dtype %s, decode dtype %s, fill-in-the-middle %s",
                        self.name or "(given)", st["device"], st["dtype"], st["decodeDtype"], st["fim"] or "no")

    def _run_request(self, fn: Callable[[Request], T], req: Request) -> T:
        if self._load_error is not None:
            raise self._load_error
        import torch

        self._select_memory()
        with torch.inference_mode(), self._assembler.request():  # bank views stay valid through the request
            return fn(req)

    def _select_memory(self) -> None:
        """The model attends to `options.select_tokens` memory tokens (config.mem_budget, at least one
        block), read per request: the options may change while the server runs."""
        self._model.config.select_memory_tokens(self.options.select_tokens)

    def submit(self, fn: Callable[[Request], Any], key: Hashable | None = None,
               priority: int = FOREGROUND) -> Request:
        """Queue fn(request) on the worker. A request with a `key` cancels older ones with that key."""
        return self._worker.submit(fn, key, priority)

    def on_worker(self, fn: Callable[[], T]) -> T:
        """Run fn() on the worker, the model's one owner, and wait: the indexers' encodes, queued
        behind completions and answers. Inline when already on the worker."""
        if self._worker.on_thread():
            return fn()
        return self.submit(lambda _req: fn(), priority=BACKGROUND).result()

    def cancel(self, key: Hashable) -> None:
        """Cancel the newest request for `key` as stale (its caller gets an empty result, not an error)."""
        self._worker.cancel(key)

    def close(self) -> None:
        """Cancel queued work and stop the worker (the running request stops at its next step)."""
        self._typing.cancel()
        self._worker.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pending(self) -> int:
        return self._worker.pending

    # -- public API (thread-safe) --------------------------------------------------------------------

    def submit_complete(self, text: str, offset: int, path: str | None = None, mode: str | None = None,
                        max_tokens: int | None = None, memory: bool | None = None,
                        key: Hashable | None = None, sources: bool = True,
                        roots: Collection[Path] | None = None) -> Request:
        """Queue a completion at code-point `offset` of `text`; resolves to a Completion.
        sources=False skips the memory-attention pass that names them (nobody will show them).
        roots: the repositories (resolved roots) whose memory it may read; None: all of them."""
        if not 0 <= offset <= len(text):
            raise ValueError(f"offset {offset} outside the document (0..{len(text)})")
        mode = mode or self.options.mode
        if mode not in ("line", "block"):
            raise ValueError(f"mode must be 'line' or 'block', got {mode!r}")
        use_memory = self.options.memory if memory is None else memory
        key = key if key is not None else ("doc", path)
        self._typing.touch(self.options.defer_idle_ms / 1000)
        ahead = self.typeahead(key, text, offset, mode)
        if ahead is not None:
            return ahead
        return self.submit(lambda req: self._typed(req, text, offset, path, mode, max_tokens, use_memory, key,
                                                   sources, roots), key=key)

    def _typed(self, req: Request, *args: Any) -> Completion:
        """A completion; the pause deferred encodes wait for starts when it ends (it may outlast the idle
        time: counted from its submission only, the encode would run right after it, before the next key)."""
        try:
            return self._complete(req, *args)
        finally:
            self._typing.touch(self.options.defer_idle_ms / 1000)

    def typeahead(self, key: Hashable, text: str, offset: int, mode: str | None = None) -> Request | None:
        """A request already answered with the rest of the last suggestion, when the keys typed since
        it follow that suggestion (same text after the cursor): what the model would say again, at no
        cost. It supersedes older requests for the document like any new request. None otherwise."""
        mode = mode or self.options.mode
        last = self._suggested.get(key)
        if last is None or not self.options.typeahead:
            return None
        head, suggestion, suffix = last
        if len(text) - offset != len(suffix) or offset <= len(head) or text[offset:] != suffix \
                or not text.startswith(head):
            return None
        typed = text[len(head):offset]
        rest = suggestion[len(typed):]
        if not suggestion.startswith(typed) or not rest.strip():
            return None
        t0 = time.perf_counter()
        timings = {"queue": 0.0, "typeahead": 1.0, "generatedTokens": 0, "total": _ms(t0, time.perf_counter())}
        self.last_timings = timings
        self._worker.counts["typeahead"] += 1
        req = Request(lambda _req: None, key)
        return self._worker.answered(req, Completion(rest, req.id, [], timings, "typeahead", mode))

    def complete(self, text: str, offset: int, path: str | None = None, mode: str | None = None,
                 **kwargs: Any) -> Completion:
        return self.submit_complete(text, offset, path, mode, **kwargs).result()

    def submit_answer(self, question: str, on_token: Callable[[str], None] | None = None,
                      document: tuple[str, str] | None = None, max_tokens: int | None = None,
                      memory: bool | None = None, key: Hashable = ("ask",),
                      messages: Sequence[Mapping[str, str]] | None = None,
                      roots: Collection[Path] | None = None) -> Request:
        """Queue an answer; `document` = (path, text) of the file the question is about, if any. A newer
        question with the same `key` supersedes it (one key per editor session). `messages` (role, content):
        the whole conversation ending with `question`, for chat clients; its system text follows ours.
        `roots`: as in submit_complete."""
        if not question.strip():
            raise ValueError("the question is empty")
        use_memory = self.options.memory if memory is None else memory
        return self.submit(lambda req: self._answer(req, question, on_token, document, max_tokens, use_memory,
                                                    messages, roots), key=key)

    def answer(self, question: str, on_token: Callable[[str], None] | None = None, **kwargs: Any) -> Answer:
        return self.submit_answer(question, on_token, **kwargs).result()

    def submit_generate(self, token_ids: Sequence[int], memory: Memory | None = None, max_new_tokens: int = 32,
                        stop: Callable[[list[int]], bool] | None = None,
                        on_token: Callable[[int], None] | None = None, session: Hashable | None = None,
                        sources: bool = False) -> Request:
        """Queue greedy decoding from token ids (B=1) with optional memory (B=1); resolves to a Generation.

        `session` names a prefix-reuse slot (and is the newest-wins key); stop(new_ids) -> True ends it.
        """
        ids = [int(t) for t in token_ids]

        def job(req: Request) -> Generation:
            stream = None if on_token is None else (lambda tok, _new: on_token(tok))
            return self._decoder.generate(req, ids, memory, max_new_tokens, stop=stop, on_token=stream,
                                          session=session, sources=sources)
        return self.submit(job, key=None if session is None else ("gen", session))

    def generate(self, token_ids: Sequence[int], memory: Memory | None = None, max_new_tokens: int = 32,
                 **kwargs: Any) -> Generation:
        return self.submit_generate(token_ids, memory, max_new_tokens, **kwargs).result()

    def context_tokens(self, max_new_tokens: int) -> int:
        """Local window size for a request: keeps last_context_length + max_new_tokens <= window."""
        window = self.model.window
        if max_new_tokens >= window:
            raise ValueError(f"max tokens {max_new_tokens} must be below the model window ({window})")
        wanted = self.options.context_tokens or self.model.config.last_context_length
        return max(1, min(wanted, window - max_new_tokens))

    def status(self) -> dict[str, Any]:
        w = self._worker
        busy = {f"{k}Ms": int(v) for k, v in w.busy_ms.items()}  # worker time per outcome
        out: dict[str, Any] = {"state": self.state, "model": self.name, "pending": w.pending,
                               "running": w.running, "requests": {**w.counts, **busy},
                               "sessions": self._decoder.sessions if self._decoder else 0,
                               "lastTimings": dict(self.last_timings)}
        if self._ready.is_set() and self._model is not None:
            out.update(self._model_status())
        if self._load_error is not None:
            out["error"] = str(self._load_error)
        return out

    def _model_status(self) -> dict[str, Any]:
        """The loaded model as status() reports it: where it runs, in what dtype, its window and layers."""
        from .model.decode_weights import decode_dtype

        m = self._model
        decode = decode_dtype(m)
        return dict(device=str(m.device), dtype=str(m.dtype).replace("torch.", ""), window=m.window,
                    decodeDtype=str(decode or m.dtype).replace("torch.", ""),
                    contextTokens=self.context_tokens(min(self.options.max_tokens, m.window // 2)),
                    memLayers=list(m.config.mem_layers),
                    fim=self._fim.template.name if self._fim and self.options.fim else None)

    # -- jobs (worker thread) ------------------------------------------------------------------------

    def _complete(self, req: Request, text: str, offset: int, path: str | None, mode: str,
                  max_tokens: int | None, use_memory: bool, key: Hashable, sources: bool = True,
                  roots: Collection[Path] | None = None) -> Completion:
        t0 = time.perf_counter()
        max_new = self._clamp(max_tokens or self.options.max_tokens)
        # The buffer goes to memory in blocks only when no repository holds the file: else that repository's
        # bank stands for it (assembly.py). Should a repository open or close before `assemble`, its blocks
        # are dropped there, or this one request has no memory of the buffer beyond the window.
        blocks = use_memory and self._assembler.home(path, roots) is None
        prompt, ids, healed, fim = self._completion_prompt(text, offset, self.context_tokens(max_new), blocks)
        t1 = time.perf_counter()
        asm = self._assembler.assemble(path, prompt.before + prompt.after, roots=roots,
                                       buffer=Buffer(text, prompt.window_offset, offset),
                                       defer_edits=self.options.defer_edits,
                                       retrieve=lambda: Query.before_cursor(text[:offset]),
                                       next_tokens=self._knn_on()) if use_memory else NOTHING
        self._encode_deferred_later()  # scheduled now: encoded even if typing cancels this completion
        t2 = time.perf_counter()
        syntax = SyntaxBlock.at(path, text, offset) if mode == "block" and not rest_of_line(prompt.suffix).strip() \
            else None
        stop = _Stop(StopRule(mode, prompt.line_prefix, prompt.suffix, syntax, fim=fim), self._decoder.continuation,
                     ids, healed, after_space=prompt.line_prefix.endswith(" "))
        knn = self._knn(asm)
        gen = self._decoder.generate(req, ids, asm.memory, max_new, stop=stop, session=key,
                                     sources=sources and asm.memory is not None,
                                     source_steps=self.options.completion_source_steps, forced_prefix=healed,
                                     text_first=stop.rule.text_first, repetition=self.options.repetition, knn=knn)
        if gen.stop_reason != "stop":
            stop.final(gen.tokens, out_of_tokens=gen.stop_reason == "max_tokens")
        out = finish(stop.kept, prompt.suffix)
        found = self._assembler.sources(gen.memory_attention, gen.attention_norm, asm, self.options.top_sources)
        timings = {"queue": _ms(req.submitted, req.started or t0), "prompt": _ms(t0, t1), "memory": _ms(t1, t2),
                   **gen.timings, "total": _ms(t0, time.perf_counter()), "memoryTokens": asm.tokens,
                   "knnTokens": len(knn.datastore) if knn else 0, "generatedTokens": len(gen.tokens)}
        self.last_timings = timings
        self._remember(key, text, offset, out)
        return Completion(out, req.id, found, timings, gen.stop_reason, stop.rule.mode, len(ids), gen.reused_tokens,
                          asm.tokens, len(gen.tokens))

    def _knn_on(self) -> bool:
        """Whether completions and answers mix in the kNN lookup (memory.knnWeight > 0, a model with memory
        layers): then requests need their memory's next_ids and the warm-up keeps chunk ids."""
        return self.options.knn_weight > 0 and bool(self._model.config.mem_layers)

    def _knn(self, asm: Assembled) -> Knn | None:
        """The kNN lookup over `asm`'s memory (knn.py); None when off or no memory slot has a next token. The
        datastore is kept while the request memory is (typing on reuses it)."""
        if not self._knn_on() or asm.memory is None or asm.next_ids is None:
            return None
        from .knn import Datastore, Knn, QueryProbe

        layer = max(self._model.config.mem_layers)
        if self._knn_last is None or self._knn_last[0]() is not asm:
            self._knn_last = (weakref.ref(asm), Datastore.of(asm.memory, asm.next_ids, layer))
        if self._knn_probe is None:
            self._knn_probe = QueryProbe(self._model, layer)
        store = self._knn_last[1]
        return Knn(store, self._knn_probe, self.options.knn_weight) if store is not None else None

    def _encode_deferred_later(self) -> None:
        """Encode the edited chunks the last completion left out once completions pause (`defer_idle_ms`),
        behind the foreground work, one chunk per job (a keystroke then waits for one chunk's encode at
        most), nearest the cursor first. One chain: each job queues the next while some remain."""
        if self._assembler.deferred:
            self._typing.schedule()

    def _queue_deferred(self) -> None:
        """(timer thread) The pause came: queue the next deferred encode on the worker."""
        try:
            self.submit(self._encode_deferred, key=DEFERRED, priority=BACKGROUND)
        except Closed:  # shutting down: no request will read the cache
            logger.debug("engine closed: deferred edits not encoded")

    def _encode_deferred(self, req: Request) -> None:
        """One chunk, unless a keystroke came while this job was queued (then: wait for the next pause)."""
        if self._typing.busy() or self._assembler.encode_deferred():
            self._encode_deferred_later()

    def warm_retrieval(self) -> None:
        """Read the chunk texts retrieval ranks (memory.retrieveTokens) in the background, one job of
        Assembler.warm at a time behind any request, so that the first completion after indexing does not."""
        if self.options.memory and self.options.retrieve_tokens > 0:
            self._queue_warm(restart=True)

    def _queue_warm(self, restart: bool = False) -> None:
        try:
            self.submit(lambda _req: self._warm(restart), key=WARMING, priority=BACKGROUND)
        except Closed:
            logger.debug("engine closed: retrieval not warmed")

    def _warm(self, restart: bool) -> None:
        if self._assembler.warm(restart=restart):
            self._queue_warm()

    def _completion_prompt(self, text: str, offset: int, context: int, blocks: bool
                           ) -> tuple[Prompt, list[int], str, bool]:
        """(the buffer split, with memory blocks if `blocks`; the prompt ids, the healed text,
        whether the prompt is FIM) for a local context of `context` tokens (see the module docstring)."""
        fim = self._fim if self.options.fim else None
        memory_tokens = self.options.buffer_memory_tokens if blocks else 0
        if fim is None or context < fim.special_tokens + 2:
            prompt = build_prompt(self._tokenizer, text, offset, context, memory_tokens=memory_tokens)
            ids, healed = self._heal(prompt.ids, prompt.line_prefix)
            return prompt, ids or self._start_ids(), healed, False
        usable = context - fim.special_tokens
        budget = FimBudget(context, min(self.options.fim_suffix_share, self.options.fim_suffix_tokens / usable))
        n_suffix = budget.suffix_tokens(fim)
        # the window fits beside the largest suffix, so fim_prompt keeps all of it (same k as typing goes on)
        prompt = build_prompt(self._tokenizer, text, offset, max(1, usable - n_suffix), memory_tokens=memory_tokens,
                              suffix_tokens=n_suffix)
        prefix, healed = self._heal(prompt.ids, prompt.line_prefix)
        return prompt, fim_prompt(fim, prefix, prompt.suffix_ids, budget).ids, healed, True

    def _remember(self, key: Hashable, text: str, offset: int, out: str) -> None:
        """Keep the suggestion for typeahead (the newest `sessions` documents)."""
        if not out.strip():
            self._suggested.pop(key, None)
            return
        self._suggested[key] = (text[:offset], out, text[offset:])
        self._suggested.move_to_end(key)
        while len(self._suggested) > self.options.sessions:
            self._suggested.popitem(last=False)

    def _answer(self, req: Request, question: str, on_token: Callable[[str], None] | None,
                document: tuple[str, str] | None, max_tokens: int | None, use_memory: bool,
                messages: Sequence[Mapping[str, str]] | None = None,
                roots: Collection[Path] | None = None) -> Answer:
        t0 = time.perf_counter()
        max_new = self._clamp(max_tokens or self.options.answer_max_tokens)
        budget = self._model.window - max_new
        path, text = document or (None, "")
        memory_tokens = self.options.buffer_memory_tokens  # 0: no memory of the document
        query = Query.question(question)
        buffer = Buffer(text) if use_memory and text.strip() and memory_tokens else None
        blocks: list[Block] = []
        if buffer is not None and self._assembler.home(path, roots) is None:  # in blocks as in _complete
            blocks = build_prompt(self._tokenizer, text, 0, 1, stride=256, memory_tokens=memory_tokens).after
        asm = self._assembler.assemble(path, blocks, roots=roots, buffer=buffer,
                                       retrieve=lambda: query,
                                       next_tokens=self._knn_on()) if use_memory else NOTHING
        defined = self._assembler.defined(asm, query.definitions)
        ids = ask_prompt_ids(self._tokenizer, question, path, messages, defined)[-budget:]
        t1 = time.perf_counter()
        stream = _Stream(self._tokenizer, on_token, self.options.answer_repetition)
        knn = self._knn(asm)
        # exact: each question retrieves its own memory, and a prompt reused under another one's memory made
        # the answer depend on the question before it (116 of 146 answers of bench/ask_facts.py changed)
        gen = self._decoder.generate(req, ids, asm.memory, max_new, on_token=stream, session=("ask",),
                                     sources=asm.memory is not None, repetition=self.options.answer_repetition,
                                     exact=True, knn=knn)
        text = stream.flush(gen.tokens)
        timings = {"queue": _ms(req.submitted, req.started or t0), "memory": _ms(t0, t1), **gen.timings,
                   "total": _ms(t0, time.perf_counter()), "knnTokens": len(knn.datastore) if knn else 0}
        found = self._assembler.sources(gen.memory_attention, gen.attention_norm, asm, self.options.top_sources,
                                        named=query.definitions)
        return Answer(text.strip(), req.id, found, timings, gen.stop_reason, asm.tokens, len(gen.tokens), len(ids))

    def _chunk_ids(self, text: str, context: str) -> tuple[list[int], int]:
        """A chunk's ids after its context's tail, and where the chunk's begin: the row the indexer's encoder
        builds (indexer.encoder.Encoder.encode: token_ids and context_ids)."""
        window = self._model.config.max_position_embeddings
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"][:window]
        room = window - len(ids)
        lead = self._tokenizer(context, add_special_tokens=False)["input_ids"] if context and ids and room > 0 else []
        lead = lead[len(lead) - room:] if len(lead) > room else lead
        return lead + ids, len(lead)

    def _encode(self, ids: list[int]) -> Memory:
        import torch

        return self._model.encode_memory(torch.tensor([ids], device=self._model.device))

    def _clamp(self, max_new: int) -> int:
        """Text-level requests keep at least half the window for the prompt (settings allow up to 1024)."""
        limit = self._model.window // 2
        if max_new > limit:
            logger.debug("max tokens %d clamped to %d (half the model window)", max_new, limit)
        return max(1, min(max_new, limit))

    def _start_ids(self) -> list[int]:
        """A prompt for an empty prefix: BOS if the tokenizer has one, else a newline."""
        bos = getattr(self._tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else self._tokenizer("\n", add_special_tokens=False)["input_ids"]

    def _heal(self, ids: list[int], line_prefix: str) -> tuple[list[int], str]:
        """Token healing: (prompt ids, text to regenerate) for a cursor on a blank line or after indentation,
        inside a word, after punctuation, or after the spaces that follow either.

        BPE tokenizers merge a line's start with its first word ("\n   " + " return"), and a word with the
        space before it (" term"), so a prompt that ends inside the indentation ("\n    "), inside a word
        the user is typing (" te") or on the space after one ("raise ") ends on a split the model never
        saw in training: it then answers nothing, a mis-indented line, a new word glued on (" te" +
        ".get(...)" where `term_len` was due), or after a bare space a number (digits follow one in BPE:
        `raise 404`) or a word with a second space. Punctuation merges too (`("`, `()`, `["`, `(*`, `.__`):
        after `open(` the model had only ever seen `(` before a word, so `open("` and `f()` were out of
        reach. Blank lines merge with what follows them ("()" + "\n\n           " + " with") and end a
        prompt as one token ("\n\n\n", never followed by a word in training): on a line after a blank one
        the model wrote one more blank line, which line mode cuts to nothing (all 39 crossfile holes at
        column 0 after a blank line). Drop the trailing tokens of that whitespace (back to the last line
        with text), or the last token of that word, punctuation or those spaces when it lies within them
        (with the spaces before them), and let generation redo them, forced to start with exactly that text
        (`Decoder._opening`: healed whitespace only as the tokenizer splits it before text, or by a token that
        goes on past it; "\n    " itself ends a prompt, never a line's indentation before code).
        """
        within: Callable[[str], bool]
        if not line_prefix.strip(" \t"):
            # a blank line before the cursor: the whitespace back to the last line with text, blank lines
            # included (BPE writes them with the indentation after them: "()" + "\n\n           " + " with"), in
            # HEALED_WHITESPACE_TOKENS at most (a file of blank lines left a one-token prompt and a forced text
            # longer than the completion)
            within, most = (lambda text: not text.strip()), HEALED_WHITESPACE_TOKENS
        else:
            # the line's last run of text (its last token must lie within it) and the spaces before it; or the
            # whitespace it ends with, any kind (a form feed, a no-break space: the search always matches)
            within, most = re.search(r"[ \t]*\S+$|\s+$", line_prefix).group().endswith, 1
        cut, removed = len(ids), ""
        while len(ids) - cut < most and cut > 1:
            # read as the tokens continue the prompt, as generation reads them (SentencePiece's "▁te" is then
            # " te"; decoded alone, "te")
            text = self.decoder.continuation(ids[:cut - 1], ids[cut - 1:])
            piece = text[:len(text) - len(removed)]  # the token added at the left
            if not piece or not within(text):
                break
            cut, removed = cut - 1, text
        return (ids[:cut], removed) if removed else (ids, "")


class _Stop:
    """A completion's stop test over generated ids; `kept` is the text the rule keeps so far."""

    def __init__(self, rule: StopRule, continuation: Callable[[Sequence[int], Sequence[int]], str],
                 prompt_ids: list[int], healed: str, after_space: bool = False):
        self.rule, self._continuation, self._ids, self._healed = rule, continuation, prompt_ids, healed
        self._after_space = after_space
        self.kept = ""

    def after_cursor(self, new: list[int]) -> str | None:
        """The text after the cursor: the continuation less the healed text (already typed). After a typed
        space, less one more space before a word: BPE puts a word's space in its token (" def"), so a
        model that redid the indentation as one 4-space token went on with " def", and the editor indented
        the line a column too far (7 of 60 completions on bench/crossfile's seed 9). More spaces stay:
        they indent deliberately."""
        text = self._continuation(self._ids, new)
        if len(text) < len(self._healed):
            return None
        out = text[len(self._healed):]
        return out[1:] if self._after_space and re.match(r" \S", out) else out

    def __call__(self, new: list[int]) -> bool:
        text = self.after_cursor(new)
        if text is None:
            return False
        self.kept, done = self.rule(text)
        return done

    def final(self, new: list[int], out_of_tokens: bool) -> None:
        """Generation ended for another reason (eos, a loop, the token budget): what the rule keeps of all of
        it, less a line the budget cut."""
        text = self.after_cursor(new) or ""
        self.kept = self.rule.ended(text, out_of_tokens)


class _Stream:
    """Streams an answer's text as tokens arrive (whole characters only), then the rest at the end.

    With a repetition guard, tokens that repeat earlier ones, and lines that copy the line before them,
    are held until the repeat breaks: when it grows into a loop, the guard cuts it and the reader never
    saw its second copy.
    """

    def __init__(self, tokenizer: Any, on_token: Callable[[str], None] | None, guard: RepetitionGuard | None = None):
        self._tokenizer, self._on_token, self._guard, self.shown = tokenizer, on_token, guard, 0

    def __call__(self, _tok: int, new: list[int]) -> None:
        if self._on_token is None:
            return
        ready = len(new) - (self._guard.held(new) if self._guard is not None else 0)
        text = streamable_text(self._tokenizer, new[:ready])
        if text is None:
            return
        end = len(text) - (self._guard.held_text(text) if self._guard is not None else 0)
        end = len(text[:end].rstrip())  # line breaks wait for the next text: a cut loop leaves none
        if end > self.shown:
            self._on_token(text[self.shown:end])
            self.shown = end

    def flush(self, tokens: list[int]) -> str:
        """The rest of the answer's text, without trailing whitespace (as Answer.text); returns all of it."""
        text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        end = len(text.rstrip())
        if self._on_token is not None and end > self.shown:
            self._on_token(text[self.shown:end])
        return text
