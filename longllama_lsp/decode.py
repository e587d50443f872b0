"""The product's one decode loop: chunked prefill, greedy decoding, prefix reuse. Worker thread only.

Prefix reuse: each session (a document) keeps the `LongLlamaCache` of its last request and the
tokens in it. A new request crops that cache to the common token prefix (`cache.crop`) and prefills
only the rest; positions continue from the crop point because RoPE positions are rebased inside
the local window (spec §2.2.5). The memory part is swapped (`cache.memory = ...`) when it changed;
local states above the first memory layer were computed with the old memory then (an approximation
accepted for speed while typing; with unchanged memory reuse is exact, see tests/test_engine.py). An
`exact` request (an answer: each question retrieves its own memory) reuses a cache only under the same
memory.

Threads: the worker is the only thread that runs the model (the indexer encodes through it too), so
switching torch's process-wide thread count for few-token steps here touches no one else's work.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .repetition import RepetitionGuard
from .worker import Cancelled, Request

if TYPE_CHECKING:
    import torch

    from .knn import Knn
    from .model.memory import Memory

logger = logging.getLogger(__name__)

SMALL_STEP = 16  # tokens: a prefill chunk this short runs with the decode threads


@dataclass
class Generation:
    tokens: list[int]
    stop_reason: str  # "stop" (the caller's rule), "eos", "max_tokens", "repetition" (a loop, cut after its first copy)
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose local cache came from the previous request
    memory_attention: torch.Tensor | None  # (M,) attention mass per memory slot, summed
    attention_norm: float  # queries * heads * memory layers: divide by it for shares
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds


@dataclass
class DecodeOptions:
    prefill_chunk: int = 256  # tokens per prefill forward: the cancellation granularity of prefill
    sessions: int = 4  # documents whose local cache is kept (each up to a window of all layers)
    # Sources from memory-attention weights of the last prompt token and the first 3 generated
    # tokens, then every 8th: +70% per step while on (42k-token memory, SmolLM2, CPU).
    source_steps: int = 3
    source_every: int = 8
    # Torch threads for steps of a few tokens (decode, and typing's short prefills). None: one thread
    # on a CPU whose load average says the cores are taken, else torch's own count. Measured on a
    # 2-core CPU at load ~10: 3,425 ms/token with 2 threads against 792 ms/token with 1 (each op of
    # a one-token step wakes the other thread, which the scheduler has given to someone else).
    decode_threads: int | None = None


@dataclass
class _Session:
    cache: Any  # LongLlamaCache
    fed: list[int]  # tokens whose keys/values are in the local cache
    memory: Memory | None  # the memory the cache was computed with


@dataclass
class _AttentionSum:
    """Memory-attention mass summed over the steps that asked for sources."""

    mass: torch.Tensor | None = None  # (M,)
    queries: int = 0  # queries * heads * memory layers that contributed

    def add(self, weights: dict[int, torch.Tensor], tokens: int, heads: int) -> None:
        mass = sum(w[0].float() for w in weights.values())  # (M,)
        self.mass = mass if self.mass is None else self.mass + mass
        self.queries += tokens * heads * len(weights)


# The word token texts are read after (`_texts_after_a_word`) and healed whitespace is split after
# (`_own_starts`): SentencePiece drops a token's leading space when it is decoded alone.
WORD = "a"
# A text that starts a blank line: spaces or tabs at most, then a line break.
BLANK_START = re.compile(r"[ \t]*\r?\n")
# A text that starts with whitespace (more indentation, or a line break).
SPACE_START = re.compile(r"\s")


class _TokenTexts:
    """Token texts (index = id) for the forced-prefix mask: which ids may come next while `need` is
    still to be produced. A scan of the vocabulary per forced step cost 8-14 ms at 49k tokens; here the
    ids whose text starts with `need` are one range of the sorted texts, and those that are a part of
    it one (short) range per prefix."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        order = sorted((t, i) for i, t in enumerate(texts) if t)
        self._sorted = [t for t, _ in order]
        self._ids = [i for _, i in order]

    def allowed(self, need: str, then_not: re.Pattern[str] | None = None,
                starts: Collection[str] | None = None) -> list[int]:
        """Ids whose text covers `need` (starts with it), or is a part of it that leaves only whitespace
        (a word is not split: " " then "te" for " te" is a split the model never saw). Given `starts` (the
        tokenizer's own first tokens of `need` before text), a part must be one of them, and so must the
        token that is exactly `need`: whitespace split anywhere else was never seen either ("\n    " then
        "def", where BPE writes "\n   " + " def"). With `then_not`, none whose text goes on past `need` with
        what it matches (`text_first`: a blank line, more indentation)."""
        covering = self._between(need, need + "\U0010ffff")  # texts starting with need sort here
        if starts is not None and need not in starts:
            covering = slice(self._between(need, need + "\0").stop, covering.stop)  # not the text equal to need
        out = self._ids[covering] if then_not is None else \
            [i for i, t in zip(self._ids[covering], self._sorted[covering], strict=True)
             if not then_not.match(t, len(need))]
        for k in range(1, len(need)):
            if not need[k:].strip() and (starts is None or need[:k] in starts):
                out += self._ids[self._between(need[:k], need[:k] + "\0")]  # the texts equal to need[:k]
        return out

    def _between(self, lo: str, hi: str) -> slice:
        """Where the texts t with lo <= t < hi lie in the sorted texts (and their ids)."""
        return slice(bisect.bisect_left(self._sorted, lo), bisect.bisect_left(self._sorted, hi))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000, 2)


class Decoder:
    """Greedy decoding on one model with per-session prefix reuse (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, options: Callable[[], DecodeOptions],
                 stop_ids: Sequence[int] = ()):
        """stop_ids: tokens that end a generation besides the tokenizer's special ones (e.g. FIM's)."""
        self.model, self.tokenizer, self._options = model, tokenizer, options
        self._extra_stop_ids = {int(t) for t in stop_ids}
        self._sessions: OrderedDict[Hashable, _Session] = OrderedDict()
        self._token_texts: _TokenTexts | None = None  # each token id's text after a word (forced prefixes)
        self._no_text: Any = None  # (V,) bool: the ids that put no text on a line: spaces, a line break (text_first)

    @property
    def options(self) -> DecodeOptions:
        return self._options()  # the engine's current options (settings updates replace them)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def generate(self, req: Request, ids: list[int], memory: Memory | None, max_new: int, *,
                 stop: Callable[[list[int]], bool] | None = None,
                 on_token: Callable[[int, list[int]], None] | None = None, session: Hashable | None = None,
                 sources: bool = False, source_steps: int | None = None, forced_prefix: str = "",
                 text_first: bool = False, repetition: RepetitionGuard | None = None, exact: bool = False,
                 knn: Knn | None = None) -> Generation:
        """Greedy tokens after `ids` (B=1) with `memory`. stop(new_ids) -> True ends it; `sources`
        samples memory attention (see `_samples_sources`); the text of the first generated tokens is
        forced to start with `forced_prefix` (token healing), and with `text_first` to put text on the line right
        after it (the cursor's line is blank: a completion that began with a blank line was empty in line mode,
        one that began with more spaces was indented past the cursor); a loop that `repetition` spots ends
        it after the loop's first copy (issue 19). `exact`: the session's cache is reused only under the
        same memory (no swap: the answer does not depend on what was asked before). `knn`: each step's
        next token is chosen from the model's distribution mixed with the kNN lookup's (knn.py)."""
        import torch

        window = self.model.window
        if not ids:
            raise ValueError("generate needs at least one prompt token")
        if len(ids) + max_new > window:
            raise ValueError(f"{len(ids)} prompt + {max_new} new tokens exceed the model window ({window}); "
                             "keep last_context_length + max_new_tokens <= window (spec §2.3)")
        t0 = time.perf_counter()
        state = self._resume(session, ids, memory, exact)
        reused = len(state.fed)
        attention = _AttentionSum()
        threads = torch.get_num_threads()
        try:
            out = self._prefill(req, state, ids[reused:], memory, attention, sources, threads)
            t1 = time.perf_counter()
            generated, reason = self._decode(req, state, out, ids, memory, max_new, stop, on_token, attention,
                                             sources, source_steps, forced_prefix, text_first, repetition, knn)
            t2 = time.perf_counter()
        except BaseException as exc:
            if isinstance(exc, Cancelled):
                self._save(session, state)  # a cancelled request's cache serves the next one
            else:
                self._sessions.pop(session, None)
            raise
        finally:
            torch.set_num_threads(threads)
        self._save(session, state)
        return Generation(generated, reason, len(ids), reused, attention.mass, float(attention.queries),
                          {"prefill": ms(t0, t1), "decode": ms(t1, t2), "prefillTokens": len(ids) - reused})

    def _step(self, state: _Session, tokens: list[int], memory: Memory | None, attention: _AttentionSum,
              sources: bool) -> Any:
        import torch

        model = self.model
        out = model(torch.tensor([tokens], device=model.device), past_key_values=state.cache,
                    memory=memory if state.cache is None else None, use_cache=True,
                    last_context_length=model.window, output_memory_attention=sources, logits_to_keep=1)
        state.cache = out.past_key_values
        state.fed.extend(tokens)
        if sources and out.memory_attention:
            attention.add(out.memory_attention, len(tokens), model.config.num_attention_heads)
        return out

    def _prefill(self, req: Request, state: _Session, rest: list[int], memory: Memory | None,
                 attention: _AttentionSum, sources: bool, threads: int) -> Any:
        """Feed the prompt tokens not in the cache; returns the output of the last step."""
        import torch

        few = self._decode_threads(threads)
        # A keystroke's few new tokens go in one step (one read of the weights; sources from all
        # of them); a long prompt in chunks, then its last token alone for the sources.
        last = len(rest) if len(rest) <= SMALL_STEP else 1
        chunk = max(1, self.options.prefill_chunk)
        for b in range(0, len(rest) - last, chunk):
            req.check()
            part = rest[b:min(b + chunk, len(rest) - last)]
            torch.set_num_threads(few if len(part) <= SMALL_STEP else threads)
            self._step(state, part, memory, attention, False)
        req.check()
        torch.set_num_threads(few)
        return self._step(state, rest[-last:], memory, attention, sources)  # its last query predicts token 1

    def _decode(self, req: Request, state: _Session, out: Any, ids: list[int], memory: Memory | None,
                max_new: int, stop: Callable[[list[int]], bool] | None,
                on_token: Callable[[int, list[int]], None] | None, attention: _AttentionSum, sources: bool,
                source_steps: int | None, forced_prefix: str, text_first: bool,
                repetition: RepetitionGuard | None, knn: Knn | None = None) -> tuple[list[int], str]:
        """Greedy steps after the prefill: (generated ids, stop reason)."""
        generated: list[int] = []
        stop_ids = self._stop_ids()
        opening = bool(forced_prefix) or text_first  # until the text is past what `_opening` constrains
        while len(generated) < max_new:
            logits = out.logits[0, -1] if knn is None else knn(out.logits[0, -1])  # (V,)
            if opening:
                allowed, opening = self._opening(self.continuation(ids, generated), forced_prefix, text_first)
                if allowed is not None and bool(allowed.any()):
                    logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
            nxt = int(logits.argmax())
            if nxt in stop_ids:
                return generated, "eos"
            generated.append(nxt)
            if on_token is not None:
                on_token(nxt, generated)
            if stop is not None and stop(generated):
                return generated, "stop"
            keep = None if repetition is None else self._loop_end(repetition, ids, generated)
            if keep is not None:
                del generated[keep:]
                return generated, "repetition"
            if len(generated) == max_new:
                break
            req.check()
            out = self._step(state, [nxt], memory, attention,
                             sources and self._samples_sources(len(generated), source_steps))
        return generated, "max_tokens"

    def _loop_end(self, guard: RepetitionGuard, prompt_ids: Sequence[int], generated: list[int]) -> int | None:
        """How many generated ids to keep when they end in a loop, else None. The line check
        decodes the text only when the newest token holds a line break."""
        keep = guard.check(generated)
        if keep is not None or "\n" not in self.tokenizer.decode(generated[-1:]):
            return keep
        cut = guard.cut_text(self.continuation(prompt_ids, generated))
        if cut is None:
            return None
        # the fewest tokens whose text covers the first copy of the line (its line break included)
        return next(k for k in range(1, len(generated) + 1)
                    if len(self.continuation(prompt_ids, generated[:k])) >= len(cut))

    def continuation(self, prompt_ids: Sequence[int], new: Sequence[int]) -> str:
        """Text of `new` as it continues the prompt (decoding alone drops SentencePiece's leading space)."""
        anchor = list(prompt_ids[-2:])
        head = self.tokenizer.decode(anchor, skip_special_tokens=True)
        full = self.tokenizer.decode(anchor + list(new), skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else self.tokenizer.decode(list(new),
                                                                                   skip_special_tokens=True)

    def _opening(self, done: str, forced: str, text_first: bool) -> tuple[Any, bool]:
        """(the token ids allowed next as a bool mask over the vocabulary, or None: any; whether a later step
        may still need one), for the text `done` generated so far. While `done` is a part of `forced`: the ids
        that continue it within `forced` (_TokenTexts.allowed; whitespace only as the tokenizer splits it,
        `_own_starts`), with `text_first` none that adds a blank line or (`_after_forced`) indents past the cursor.
        With `text_first`, once `forced` is covered and nothing follows it yet: only ids that put text on the line.
        A line break there left the line empty; more spaces indented it past the cursor (where the editor put
        it), or ran on: the bundled model once wrote 38 single spaces in a row, banned its line break each time."""
        import torch

        if len(done) < len(forced):
            if not forced.startswith(done):
                return None, False
            need = forced[len(done):]
            mask = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
            mask[self._texts().allowed(need, then_not=self._after_forced(forced, text_first),
                                       starts=self._own_starts(need))] = True
            return mask, True
        if not text_first or not done.startswith(forced) or done[len(forced):].strip():
            return None, False
        if self._no_text is None:  # the model's vocabulary may be longer than the tokenizer's
            self._no_text = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
            self._no_text[[i for i, t in enumerate(self._texts().texts) if BLANK_START.match(t) or not t.strip()]] = True
        return ~self._no_text, True

    def _own_starts(self, need: str) -> set[str] | None:
        """The tokenizer's own first token of `need` when text follows it (a word, a digit, punctuation), read
        as it continues a word: "\n\n       " for "\n\n        " (the eighth space goes with the word). Any
        other split of healed whitespace is one the model never saw: at attr/setters.py:68:9 it took "\n",
        "\n" and eight single spaces, then wrote `17.1.0`. None (any split) where the anchor word and `need`
        merge or the split cannot be read back (an unknown token), or `need` ends in no whitespace (no part of
        it is allowed then)."""
        if not need[-1:].isspace():
            return None
        anchor = self.tokenizer(WORD, add_special_tokens=False)["input_ids"]
        starts = set()
        for after in ("x", "1", "#"):
            ids = self.tokenizer(WORD + need + after, add_special_tokens=False)["input_ids"]
            start = self.continuation(anchor, ids[len(anchor):len(anchor) + 1])
            if ids[:len(anchor)] != anchor or not start or not (need + after).startswith(start):
                return None
            starts.add(start)
        return starts

    @staticmethod
    def _after_forced(forced: str, text_first: bool) -> re.Pattern[str] | None:
        """What a token that covers `forced` may not go on with: with `text_first`, a blank line; and more
        indentation when the cursor's line already holds some (`forced` ends in it: the editor indented it, so
        the model's deeper line, `   # ...` three columns in, was misplaced). At column 0 a deeper line stays
        (`"\n    "` after `def f():` where no editor indented)."""
        if not text_first:
            return None
        return SPACE_START if forced.rsplit("\n", 1)[-1] else BLANK_START

    def _texts(self) -> _TokenTexts:
        if self._token_texts is None:  # a decode of every token: once per decoder
            self._token_texts = _TokenTexts(self._texts_after_a_word())
        return self._token_texts

    def _texts_after_a_word(self) -> list[str]:
        """Each token id's text as it continues a word (WORD), as `continuation` reads generated text: decoded
        alone, SentencePiece drops a leading space ("▁term" -> "term"), and " te" then matched nothing."""
        anchor = self.tokenizer(WORD, add_special_tokens=False)["input_ids"][-1:]
        head = self.tokenizer.decode(anchor, skip_special_tokens=False)
        out = []
        for i in range(len(self.tokenizer)):
            text = self.tokenizer.decode(anchor + [i], skip_special_tokens=False)
            out.append(text[len(head):] if text.startswith(head)
                       else self.tokenizer.decode([i], skip_special_tokens=False))
        return out

    def _stop_ids(self) -> set[int]:
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or []) | self._extra_stop_ids
        for eos in (getattr(self.tokenizer, "eos_token_id", None), self.model.config.eos_token_id):
            ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        return ids

    def _decode_threads(self, threads: int) -> int:
        """Threads for few-token steps (see DecodeOptions.decode_threads)."""
        if self.options.decode_threads is not None:
            return max(1, self.options.decode_threads)
        if str(getattr(self.model, "device", "cpu")).startswith("cpu") and threads > 1:
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

    def _resume(self, session: Hashable | None, ids: list[int], memory: Memory | None, exact: bool = False
                ) -> _Session:
        """The session's cache cropped to the common prefix with `ids` (at least one token left to feed);
        `exact`: none when the memory changed."""
        fresh = _Session(None, [], memory)
        if session is None:
            return fresh
        old = self._sessions.pop(session, None)
        if old is None or old.cache is None or exact and old.memory is not memory:
            return fresh
        common = min(common_prefix(old.fed, ids), len(ids) - 1, old.cache.local_length)
        if common <= 0:
            return fresh
        old.cache.crop(common, reuse_storage=True)  # the decoder alone holds it: no copy of the kept part
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

