"""The engine: one worker thread owns the model, the tokenizer and the device (house style 22).

Callers (LSP handlers, the CLI, the indexer) submit requests to a priority queue and get a
`Request` with a future back. Two API levels (house style 4):

    generate(token_ids, memory)                  -> Generation   tokens in, tokens out
    complete(text, offset, path, mode)           -> Completion   a buffer and a cursor in, text out
    answer(question, on_token)                   -> Answer       a question in, streamed text out

Per document (request `key`) the newest request wins: submitting one cancels the older ones.
Cancellation is a flag checked between prefill chunks and between decode steps, so a cancelled
request stops within one step; its local cache is kept for the next request.

Prefix reuse: each document keeps the `LongLlamaCache` of its last request and the tokens in it.
A new request crops that cache to the common token prefix (`cache.crop`) and prefills only the
rest; positions continue from the crop point because RoPE positions are rebased inside the local
window (spec §2.2.5). The memory part is swapped (`cache.memory = ...`) when it changed; local
states above the first memory layer were computed with the old memory then (an approximation
accepted for speed; with unchanged memory reuse is exact, see tests/test_engine.py).

Memory for a completion = every repository bank's memory minus the current file's (stale) chunks,
plus the buffer's own text outside the local window (prompt.py), encoded with
`model.encode_memory` and cached by token hash. The local window is at most
`window - max_new_tokens` tokens, so generation never hits the local-cache flush (spec §2.3).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .assembly import NOTHING, Assembler, Source
from .errors import LongLlamaError, ModelError

if TYPE_CHECKING:
    import torch

    from .model.memory import Memory

# torch (and transformers) are imported on the worker thread when the model loads, not with this
# module: the language server answers `initialize` without waiting ~10 s for them (issue 4).
from .prompt import Block, StopRule, SyntaxBlock, build_prompt, finish, incremental_text, rest_of_line

logger = logging.getLogger(__name__)

SMALL_STEP = 16  # tokens: a prefill chunk this short runs with the decode threads
FOREGROUND, BACKGROUND = 0, 1  # queue priorities: completions and answers before indexing work

ASK_SYSTEM = ("You are a coding assistant. The code of the user's repository is in your memory. "
              "Answer the question about it concisely, naming files and functions.")


class Cancelled(Exception):
    """The request was cancelled: by the client, or by a newer request for the same document."""


@dataclass
class Generation:
    tokens: list[int]
    stop_reason: str  # "stop" (the caller's rule), "eos", "max_tokens"
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose local cache came from the previous request
    memory_attention: torch.Tensor | None  # (M,) attention mass per memory slot, summed
    attention_norm: float  # queries * heads * memory layers: divide by it for shares
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds


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


@dataclass
class EngineOptions:
    mode: str = "line"
    max_tokens: int = 48  # per completion
    answer_max_tokens: int = 256
    context_tokens: int | None = None  # None: min(window - max_tokens, config.last_context_length)
    memory: bool = True  # repository + rest-of-buffer memory
    buffer_memory_tokens: int = 4096  # cap on each side of the cursor (encoded once per block, cached)
    prefill_chunk: int = 256  # tokens per prefill forward: the cancellation granularity of prefill
    sessions: int = 4  # documents whose local cache is kept (each up to a window of all layers)
    block_cache_tokens: int = 1 << 17  # encoded buffer blocks kept, in tokens
    top_sources: int = 5
    # Sources from memory-attention weights of the last prompt token and the first 3 generated
    # tokens, then every 8th: +70% per step while on (42k-token memory, SmolLM2, CPU).
    source_steps: int = 3
    source_every: int = 8
    # Completions take their sources from the last prompt token only: sampling generated tokens too
    # made each decode step 1.8x slower (792 vs 440 ms/token, 4k memory tokens, busy 2-core CPU).
    completion_source_steps: int = 0
    # Torch threads for steps of a few tokens (decode, and typing's short prefills). None: one thread
    # on a CPU whose load average says the cores are taken, else torch's own count. Measured on a
    # 2-core CPU at load ~10: 3,425 ms/token with 2 threads against 792 ms/token with 1 (each op of
    # a one-token step wakes the other thread, which the scheduler has given to someone else).
    decode_threads: int | None = None
    # Keys typed along the last suggestion get the rest of it without the model (see typeahead).
    typeahead: bool = True


class Request:
    """A queued unit of work; `future` resolves to its result, or raises Cancelled."""

    _ids = itertools.count(1)

    def __init__(self, fn: Callable[[Request], Any], key: Hashable | None = None, priority: int = FOREGROUND):
        self.id = next(self._ids)
        self.fn, self.key, self.priority = fn, key, priority
        self.future: Future = Future()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.superseded = False  # cancelled because a newer request with the same key arrived
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()
        self.future.cancel()  # succeeds only while queued

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise Cancelled if the request was cancelled (called between model steps)."""
        if self._cancel.is_set():
            raise Cancelled(f"request {self.id} cancelled")

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)


@dataclass
class _Session:
    cache: Any  # LongLlamaCache
    fed: list[int]  # tokens whose keys/values are in the local cache
    memory: Memory | None  # the memory the cache was computed with


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000, 2)


class Engine:
    """Owns the model on one worker thread; see the module docstring."""

    def __init__(self, model: Any = None, tokenizer: Any = None, *,
                 loader: Callable[[], tuple[Any, ...]] | None = None, options: EngineOptions | None = None,
                 repositories: Sequence[Any] = (), name: str = "", model_dir: Path | None = None):
        if model is None and loader is None:
            raise ValueError("Engine needs a model and tokenizer, or a loader")
        self.options = options or EngineOptions()
        self.repositories: list[Any] = list(repositories)  # objects with .bank, .root (indexers)
        self.name = name
        self.model_dir = model_dir  # the checkpoint folder (indexes are keyed by its fingerprint)
        self._model, self._tokenizer, self._loader = model, tokenizer, loader
        self._load_error: BaseException | None = None
        self._ready = threading.Event()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._latest: dict[Hashable, Request] = {}
        self._lock = threading.Lock()
        self._sessions: OrderedDict[Hashable, _Session] = OrderedDict()
        # Per document: (text before the cursor, completion, text after it) of the last completion,
        # so keys typed along the suggestion are answered from it without the model (typeahead).
        self._suggested: OrderedDict[Hashable, tuple[str, str, str]] = OrderedDict()
        self._assembler: Assembler | None = None
        self._token_texts: list[str] | None = None  # each token id decoded alone (token healing)
        self.last_timings: dict[str, float] = {}
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "typeahead": 0}
        # Worker milliseconds spent per outcome: "cancelled" is the compute that typing threw away.
        self.busy_ms = {"completed": 0.0, "cancelled": 0.0, "failed": 0.0}
        self.running: int | None = None  # id of the request on the worker
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="longllama-engine", daemon=True)
        self._thread.start()

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_path: str | os.PathLike | None = None, device: str | None = None,
             dtype: str | None = None, config_value: str | None = None, decode_dtype: str | None = None,
             **kwargs: Any) -> Engine:
        """An engine whose worker loads the model (resolve.py + model/loading.py) before its first request."""
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

    def _run(self) -> None:
        if self._model is None:
            try:
                self._model, self._tokenizer, *rest = self._loader()
                self.model_dir = Path(rest[0]) if rest else self.model_dir
                self.name = self.name or str(self.model_dir or "")
            except BaseException as exc:  # noqa: BLE001 - reported through every request instead
                if isinstance(exc, LongLlamaError):  # says what to do; no traceback needed
                    logger.error("loading the model failed: %s", exc)
                else:
                    logger.exception("loading the model failed")
                self._load_error = exc if isinstance(exc, Exception) else ModelError(str(exc))
        if self._model is not None:
            self._model.eval()
            self._assembler = Assembler(self._encode, self._model.device, self.repositories,
                                        self.options.block_cache_tokens, dtype=self._model.dtype)
        self._ready.set()
        while True:
            _, _, req = self._queue.get()
            if req is None:
                return
            if not req.future.set_running_or_notify_cancel():
                continue
            req.started = time.perf_counter()
            self.running = req.id
            try:
                if self._load_error is not None:
                    raise self._load_error
                req.check()
                import torch

                with torch.inference_mode():
                    result = req.fn(req)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                outcome = "cancelled" if isinstance(exc, Cancelled) else "failed"
                if not isinstance(exc, (Cancelled, ValueError)):
                    logger.exception("request %s failed", req.id)
                req.future.set_exception(exc)
            else:
                outcome = "completed"
                req.future.set_result(result)
            finally:
                self.running = None
                with self._lock:
                    if req.key is not None and self._latest.get(req.key) is req:
                        del self._latest[req.key]
            self.counts[outcome] += 1
            self.busy_ms[outcome] += (time.perf_counter() - req.started) * 1000

    def submit(self, fn: Callable[[Request], Any], key: Hashable | None = None,
               priority: int = FOREGROUND) -> Request:
        """Queue fn(request) on the worker. A request with a `key` cancels older ones with that key."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        req = Request(fn, key, priority)
        if key is not None:
            with self._lock:
                older = self._latest.get(key)
                self._latest[key] = req
            if older is not None:
                older.superseded = True
                older.cancel()
        self._queue.put((priority, next(self._seq), req))
        return req

    def call(self, fn: Callable[..., Any], *args: Any, background: bool = True) -> Any:
        """Run fn(*args) on the worker and wait (for the indexer's encodes); inline if already there."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.submit(lambda _req: fn(*args), priority=BACKGROUND if background else FOREGROUND).result()

    def cancel(self, key: Hashable) -> None:
        """Cancel the newest request for `key` as stale (its caller gets an empty result, not an error)."""
        with self._lock:
            req = self._latest.get(key)
        if req is not None:
            req.superseded = True
            req.cancel()

    def close(self) -> None:
        """Cancel queued work and stop the worker (the running request stops at its next step)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pending = list(self._latest.values())
        for req in pending:
            req.cancel()
        self._queue.put((-1, -1, None))
        self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    # -- public API (thread-safe) --------------------------------------------------------------------

    def submit_complete(self, text: str, offset: int, path: str | None = None, mode: str | None = None,
                        max_tokens: int | None = None, memory: bool | None = None,
                        key: Hashable | None = None, sources: bool = True) -> Request:
        """Queue a completion at code-point `offset` of `text`; resolves to a Completion.
        sources=False skips the memory-attention pass that names them (nobody will show them)."""
        if not 0 <= offset <= len(text):
            raise ValueError(f"offset {offset} outside the document (0..{len(text)})")
        mode = mode or self.options.mode
        if mode not in ("line", "block"):
            raise ValueError(f"mode must be 'line' or 'block', got {mode!r}")
        use_memory = self.options.memory if memory is None else memory
        key = key if key is not None else ("doc", path)
        ahead = self.typeahead(key, text, offset, mode)
        if ahead is not None:
            return ahead
        return self.submit(lambda req: self._complete(req, text, offset, path, mode, max_tokens, use_memory, key,
                                                      sources), key=key)

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
        req = Request(lambda _req: None, key)
        with self._lock:
            older = self._latest.pop(key, None)
        if older is not None:
            older.superseded = True
            older.cancel()
        timings = {"queue": 0.0, "typeahead": 1.0, "generatedTokens": 0, "total": _ms(t0, time.perf_counter())}
        self.last_timings = timings
        self.counts["typeahead"] += 1
        req.future.set_running_or_notify_cancel()
        req.future.set_result(Completion(rest, req.id, [], timings, "typeahead", mode))
        return req

    def complete(self, text: str, offset: int, path: str | None = None, mode: str | None = None,
                 **kwargs: Any) -> Completion:
        return self.submit_complete(text, offset, path, mode, **kwargs).result()

    def submit_answer(self, question: str, on_token: Callable[[str], None] | None = None,
                      document: tuple[str, str] | None = None, max_tokens: int | None = None,
                      memory: bool | None = None, key: Hashable = ("ask",)) -> Request:
        """Queue an answer; `document` = (path, text) of the file the question is about, if any. A newer
        question with the same `key` supersedes it (one key per editor session)."""
        if not question.strip():
            raise ValueError("the question is empty")
        use_memory = self.options.memory if memory is None else memory
        return self.submit(lambda req: self._answer(req, question, on_token, document, max_tokens, use_memory),
                           key=key)

    def answer(self, question: str, on_token: Callable[[str], None] | None = None, **kwargs: Any) -> Answer:
        return self.submit_answer(question, on_token, **kwargs).result()

    def submit_generate(self, token_ids: Sequence[int], memory: Memory | None = None, max_new_tokens: int = 32,
                        stop: Callable[[list[int]], bool] | None = None,
                        on_token: Callable[[int], None] | None = None, session: Hashable | None = None,
                        want_sources: bool = False) -> Request:
        """Queue greedy decoding from token ids (B=1) with optional memory (B=1); resolves to a Generation.

        `session` names a prefix-reuse slot (and is the newest-wins key); stop(new_ids) -> True ends it.
        """
        ids = [int(t) for t in token_ids]

        def job(req: Request) -> Generation:
            stream = None if on_token is None else (lambda tok, _new: on_token(tok))
            return self._generate(req, ids, memory, max_new_tokens, stop, stream, session, want_sources)
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
        busy = {f"{k}Ms": int(v) for k, v in self.busy_ms.items()}  # worker time per outcome
        out: dict[str, Any] = {"state": self.state, "model": self.name, "pending": self.pending,
                               "running": self.running, "requests": {**self.counts, **busy},
                               "sessions": len(self._sessions), "lastTimings": dict(self.last_timings)}
        if self._ready.is_set() and self._model is not None:
            m = self._model
            from .model.decode_weights import decode_dtype

            decode = decode_dtype(m)
            out.update(device=str(m.device), dtype=str(m.dtype).replace("torch.", ""), window=m.window,
                       decodeDtype=str(decode or m.dtype).replace("torch.", ""),
                       contextTokens=self.context_tokens(min(self.options.max_tokens, m.window // 2)),
                       memLayers=list(m.config.mem_layers))
        if self._load_error is not None:
            out["error"] = str(self._load_error)
        return out

    # -- jobs (worker thread) ------------------------------------------------------------------------

    def _complete(self, req: Request, text: str, offset: int, path: str | None, mode: str,
                  max_tokens: int | None, use_memory: bool, key: Hashable, sources: bool = True) -> Completion:
        t0 = time.perf_counter()
        max_new = self._clamp(max_tokens or self.options.max_tokens)
        ctx = self.context_tokens(max_new)
        prompt = build_prompt(self._tokenizer, text, offset, ctx, memory_tokens=self.options.buffer_memory_tokens)
        ids, healed = self._heal(prompt.ids, prompt.line_prefix)
        ids = ids or self._start_ids()
        t1 = time.perf_counter()
        asm = self._assembler.assemble(path, prompt.before + prompt.after) if use_memory else NOTHING
        t2 = time.perf_counter()
        syntax = SyntaxBlock.at(path, text, offset) if mode == "block" and not rest_of_line(prompt.suffix).strip() \
            else None
        rule, kept = StopRule(mode, prompt.line_prefix, prompt.suffix, syntax), [""]

        def after_cursor(new: list[int]) -> str | None:
            """The text after the cursor: the continuation less the healed indentation (already typed)."""
            text = self._continuation(ids, new)
            return text[len(healed):] if len(text) >= len(healed) else None

        def stop(new: list[int]) -> bool:
            text = after_cursor(new)
            if text is None:
                return False
            kept[0], done = rule(text)
            return done

        gen = self._generate(req, ids, asm.memory, max_new, stop, None, key, sources and asm.memory is not None,
                             sample_steps=self.options.completion_source_steps, forced_prefix=healed)
        if gen.stop_reason != "stop":
            kept[0], _ = rule(after_cursor(gen.tokens) or "")
        out = finish(kept[0], prompt.suffix)
        sources = self._assembler.sources(gen.memory_attention, gen.attention_norm, asm, self.options.top_sources)
        timings = {"queue": _ms(req.submitted, req.started or t0), "prompt": _ms(t0, t1), "memory": _ms(t1, t2),
                   **gen.timings, "total": _ms(t0, time.perf_counter()), "memoryTokens": asm.tokens,
                   "generatedTokens": len(gen.tokens)}
        self.last_timings = timings
        if out.strip():
            self._suggested[key] = (text[:offset], out, text[offset:])
            self._suggested.move_to_end(key)
            while len(self._suggested) > self.options.sessions:
                self._suggested.popitem(last=False)
        else:
            self._suggested.pop(key, None)
        return Completion(out, req.id, sources, timings, gen.stop_reason, rule.mode, len(ids), gen.reused_tokens,
                          asm.tokens, len(gen.tokens))

    def _answer(self, req: Request, question: str, on_token: Callable[[str], None] | None,
                document: tuple[str, str] | None, max_tokens: int | None, use_memory: bool) -> Answer:
        t0 = time.perf_counter()
        max_new = self._clamp(max_tokens or self.options.answer_max_tokens)
        budget = self._model.window - max_new
        ids = self._chat_ids(question, document[0] if document else None)[-budget:]
        blocks: list[Block] = []
        if use_memory and document is not None and document[1].strip():
            blocks = build_prompt(self._tokenizer, document[1], 0, 1,
                                  stride=256, memory_tokens=self.options.buffer_memory_tokens).after
        asm = self._assembler.assemble(document[0] if document else None, blocks, exclude_current=bool(blocks)) \
            if use_memory else NOTHING
        t1 = time.perf_counter()
        shown = [0]

        def stream(_tok: int, new: list[int]) -> None:
            delta, shown[0] = incremental_text(self._tokenizer, new, shown[0])
            if delta and on_token is not None:
                on_token(delta)

        gen = self._generate(req, ids, asm.memory, max_new, None, stream, ("ask",), asm.memory is not None)
        text = self._tokenizer.decode(gen.tokens, skip_special_tokens=True)
        if on_token is not None and len(text) > shown[0]:
            on_token(text[shown[0]:])
        timings = {"queue": _ms(req.submitted, req.started or t0), "memory": _ms(t0, t1), **gen.timings,
                   "total": _ms(t0, time.perf_counter())}
        sources = self._assembler.sources(gen.memory_attention, gen.attention_norm, asm, self.options.top_sources)
        return Answer(text.strip(), req.id, sources, timings, gen.stop_reason, asm.tokens, len(gen.tokens))

    def _encode(self, ids: list[int]) -> Memory:
        import torch

        return self._model.encode_memory(torch.tensor([ids], device=self._model.device))

    def _clamp(self, max_new: int) -> int:
        """Text-level requests keep at least half the window for the prompt (settings allow up to 1024)."""
        limit = self._model.window // 2
        if max_new > limit:
            logger.debug("max tokens %d clamped to %d (half the model window)", max_new, limit)
        return max(1, min(max_new, limit))

    def _chat_ids(self, question: str, path: str | None) -> list[int]:
        user = question if path is None else f"{question}\n\n(The question is about the file {path}.)"
        messages = [{"role": "system", "content": ASK_SYSTEM}, {"role": "user", "content": user}]
        if getattr(self._tokenizer, "chat_template", None):
            enc = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        text = f"{ASK_SYSTEM}\n\nQuestion: {user}\nAnswer:"
        return self._tokenizer(text, add_special_tokens=True)["input_ids"]

    def _start_ids(self) -> list[int]:
        """A prompt for an empty prefix: BOS if the tokenizer has one, else a newline."""
        bos = getattr(self._tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else self._tokenizer("\n", add_special_tokens=False)["input_ids"]

    def _heal(self, ids: list[int], line_prefix: str) -> tuple[list[int], str]:
        """Token healing for a cursor right after indentation: (prompt ids, whitespace to regenerate).

        BPE tokenizers merge a line's start with its first word ("\n   " + " return"), so a prompt
        that ends inside the indentation ("\n    ") ends on a split the model never saw in training:
        it then tends to answer nothing or a mis-indented line. Drop the trailing whitespace tokens
        (back to the line's newline at most) and let generation redo them, forced to start with
        exactly that text.
        """
        if not line_prefix or line_prefix.strip(" \t"):
            return ids, ""
        cut, removed = len(ids), ""
        while cut > 1:
            piece = self._tokenizer.decode(ids[cut - 1:cut], skip_special_tokens=True)
            if not piece or piece.strip() or not ("\n" + line_prefix).endswith(piece + removed):
                break
            cut, removed = cut - 1, piece + removed
            if "\n" in piece:
                break
        return (ids[:cut], removed) if removed else (ids, "")

    def _allowed_after(self, done: str, prefix: str) -> Any:
        """Token ids whose text continues `done` (a part of `prefix`) without leaving `prefix` (a bool mask)."""
        import torch

        if self._token_texts is None:
            n = len(self._tokenizer)
            self._token_texts = [self._tokenizer.decode([i], skip_special_tokens=False) for i in range(n)]
        need = prefix[len(done):]
        ok = [bool(t) and (need.startswith(t) or t.startswith(need)) for t in self._token_texts]
        mask = torch.zeros(self._model.config.vocab_size, dtype=torch.bool)
        mask[: len(ok)] = torch.tensor(ok)
        return mask

    def _continuation(self, prompt_ids: Sequence[int], new: Sequence[int]) -> str:
        """Text of `new` as it continues the prompt (decoding alone drops SentencePiece's leading space)."""
        anchor = list(prompt_ids[-2:])
        head = self._tokenizer.decode(anchor, skip_special_tokens=True)
        full = self._tokenizer.decode(anchor + list(new), skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else self._tokenizer.decode(list(new),
                                                                                    skip_special_tokens=True)

    # -- generation -----------------------------------------------------------------------------------

    def _stop_ids(self) -> set[int]:
        ids = set(getattr(self._tokenizer, "all_special_ids", []) or [])
        for eos in (getattr(self._tokenizer, "eos_token_id", None), self._model.config.eos_token_id):
            ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        return ids

    def _generate(self, req: Request, ids: list[int], memory: Memory | None, max_new: int,
                  stop: Callable[[list[int]], bool] | None, on_token: Callable[[int, list[int]], None] | None,
                  session: Hashable | None, want_sources: bool, sample_steps: int | None = None,
                  forced_prefix: str = "") -> Generation:
        import torch

        model = self._model
        window = model.window
        if not ids:
            raise ValueError("generate needs at least one prompt token")
        if len(ids) + max_new > window:
            raise ValueError(f"{len(ids)} prompt + {max_new} new tokens exceed the model window ({window}); "
                             "keep last_context_length + max_new_tokens <= window (spec §2.3)")
        t0 = time.perf_counter()
        state = self._resume(session, ids, memory)
        reused = len(state.fed)
        acc: list[torch.Tensor | None] = [None]
        queries = [0]
        heads = model.config.num_attention_heads

        def step(tokens: list[int], want: bool) -> Any:
            out = model(torch.tensor([tokens], device=model.device), past_key_values=state.cache,
                        memory=memory if state.cache is None else None, use_cache=True,
                        last_context_length=window, output_memory_attention=want, logits_to_keep=1)
            state.cache = out.past_key_values
            state.fed.extend(tokens)
            if want and out.memory_attention:
                mass = sum(w[0].float() for w in out.memory_attention.values())  # (M,)
                acc[0] = mass if acc[0] is None else acc[0] + mass
                queries[0] += len(tokens) * heads * len(out.memory_attention)
            return out

        generated: list[int] = []
        reason = "max_tokens"
        threads = torch.get_num_threads()
        few = self._decode_threads(model, threads)
        try:
            rest = ids[reused:]
            # A keystroke's few new tokens go in one step (one read of the weights; sources from all
            # of them); a long prompt in chunks, then its last token alone for the sources.
            last = len(rest) if len(rest) <= SMALL_STEP else 1
            chunk = max(1, self.options.prefill_chunk)
            for b in range(0, len(rest) - last, chunk):
                req.check()
                part = rest[b:min(b + chunk, len(rest) - last)]
                torch.set_num_threads(few if len(part) <= SMALL_STEP else threads)
                step(part, False)
            req.check()
            torch.set_num_threads(few)
            out = step(rest[-last:], want_sources)  # its last query predicts the first new token
            t1 = time.perf_counter()
            stop_ids = self._stop_ids()
            forcing = bool(forced_prefix)  # until the generated text covers forced_prefix
            while len(generated) < max_new:
                logits = out.logits[0, -1]
                if forcing:
                    done = self._continuation(ids, generated)
                    forcing = len(done) < len(forced_prefix) and forced_prefix.startswith(done)
                    allowed = self._allowed_after(done, forced_prefix).to(logits.device) if forcing else None
                    if allowed is not None and bool(allowed.any()):
                        logits = logits.masked_fill(~allowed, float("-inf"))
                nxt = int(logits.argmax())
                if nxt in stop_ids:
                    reason = "eos"
                    break
                generated.append(nxt)
                if on_token is not None:
                    on_token(nxt, generated)
                if stop is not None and stop(generated):
                    reason = "stop"
                    break
                if len(generated) == max_new:
                    break
                req.check()
                out = step([nxt], want_sources and self._samples_sources(len(generated), sample_steps))
            t2 = time.perf_counter()
        except Cancelled:
            self._save(session, state)
            raise
        except BaseException:
            self._sessions.pop(session, None)
            raise
        finally:
            torch.set_num_threads(threads)
        self._save(session, state)
        return Generation(generated, reason, len(ids), reused, acc[0], float(queries[0]),
                          {"prefill": _ms(t0, t1), "decode": _ms(t1, t2), "prefillTokens": len(ids) - reused})

    def _decode_threads(self, model: Any, threads: int) -> int:
        """Threads for few-token steps (see EngineOptions.decode_threads)."""
        if self.options.decode_threads is not None:
            return max(1, self.options.decode_threads)
        if str(getattr(model, "device", "cpu")).startswith("cpu") and threads > 1:
            try:
                busy = os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5  # more runnable threads than cores
            except OSError:
                busy = False
            return 1 if busy else threads
        return threads

    def _samples_sources(self, generated: int, steps: int | None = None) -> bool:
        """Memory-attention weights cost a second pass over memory: take them for the first
        `source_steps` generated tokens, then every `source_every`-th (sources of long answers).
        `steps` (completions) replaces both: the first `steps` generated tokens only."""
        opts = self.options
        if steps is not None:
            return generated < steps
        return generated < opts.source_steps or (opts.source_every > 0 and generated % opts.source_every == 0)

    def _resume(self, session: Hashable | None, ids: list[int], memory: Memory | None) -> _Session:
        """The session's cache cropped to the common prefix with `ids` (at least one token left to feed)."""
        fresh = _Session(None, [], memory)
        if session is None:
            return fresh
        old = self._sessions.pop(session, None)
        if old is None or old.cache is None:
            return fresh
        common = min(_common_prefix(old.fed, ids), len(ids) - 1, old.cache.local_length)
        if common <= 0:
            return fresh
        old.cache.crop(common, reuse_storage=True)  # the engine alone holds it: no copy of the kept part
        old.fed = old.fed[:common]
        if old.memory is not memory:  # bank or buffer memory changed: swap it, keep the local states
            from .model.memory import Memory

            old.cache.memory = memory if memory is not None else Memory({})
            old.memory = memory
        return old

    def _save(self, session: Hashable | None, state: _Session) -> None:
        if session is None or state.cache is None or not state.fed:
            return
        self._sessions[session] = state
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.options.sessions:
            self._sessions.popitem(last=False)


# -- loading ------------------------------------------------------------------------------------------

def default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model_and_tokenizer(model_path: str | os.PathLike | None = None, device: str | None = None,
                             dtype: str | None = None, config_value: str | None = None,
                             decode_dtype: str | None = None) -> tuple[Any, Any, Path]:
    """(model, tokenizer, checkpoint folder): --model, the model.path setting, $LONGLLAMA_MODEL or the
    bundled SmolLM2, converted on first use (resolve.py), loaded by model/loading.py.

    decode_dtype: weights for steps of a few tokens (model/decode_weights.py). None: bfloat16 copies
    when the model runs in float32 on a CPU, else none.
    """
    import torch

    from .model.decode_weights import add_decode_weights
    from .model.loading import load_model, load_tokenizer
    from .resolve import resolve_model

    device = default_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    path = resolve_model(explicit=str(model_path) if model_path else None, config_value=config_value)
    model = load_model(path, device=device, dtype=torch_dtype).eval()
    decode = decode_dtype or ("bfloat16" if device == "cpu" and torch_dtype == torch.float32 else None)
    if decode is not None and getattr(torch, decode) != torch_dtype:
        added = add_decode_weights(model, getattr(torch, decode))
        logger.info("decode steps use %s weight copies (+%.0f MB)", decode, added / 2**20)
    return model, load_tokenizer(path), Path(path)
