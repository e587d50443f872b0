"""Fill-in-the-middle (FIM) prompts: the template table keyed by the tokenizer, and prompt assembly.

Code models trained with FIM complete the middle of a file when prompted prefix-suffix-middle (PSM):

    [BOS] <prefix marker> prefix tokens <suffix marker> suffix tokens <middle marker>  -> middle ... <stop>

Which markers a model uses is told by its tokenizer's vocabulary (TEMPLATES); `detect_fim` finds
them, `fim_prompt` assembles the token ids within a token budget. Both are pure (no model, no I/O):
the engine decides when to use them (mid-line and multi-line completions; the repository stays in
memory either way). Without FIM tokens, detect_fim returns None and prompting is unchanged.
`split_fim_text` undoes a client's own FIM wrapping (an HTTP prompt), with any row's markers.

Budgets after Continue's tab-autocomplete pruning (core/util/parameters.ts: maxPromptTokens,
maxSuffixPercentage): the suffix gets at most `max_suffix_share` of the prompt, kept from its start;
the prefix gets the rest, kept from its end (next to the cursor). Continue caps the prefix too
(prefixPercentage 0.85 of 500 tokens, later 0.3 of 2048 to leave room for snippets); our snippets
are the repository in memory, so the prefix takes whatever the suffix leaves. Default 1024 tokens:
half SmolLM2's converted window, as its last_context_length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class Vocabulary(Protocol):
    """What detect_fim reads of a tokenizer: transformers' tokenizers and tokenizers.Tokenizer both have it."""

    def get_vocab(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class FimTemplate:
    name: str  # the model family that uses these markers
    prefix: str  # marker token before the prefix
    suffix: str  # marker token before the suffix
    middle: str  # marker token after which the model writes the middle
    stops: tuple[str, ...]  # tokens that end the middle (those present in the vocabulary are used)
    bos: bool  # the model was trained with BOS before the prefix marker
    # The markers as clients write them into a text prompt, where that differs from the tokens: the
    # CodeLlama paper's "<PRE> {prefix} <SUF>{suffix} <MID>" (Continue's and llm.nvim's templates).
    text: tuple[str, str, str] | None = None

    @property
    def text_markers(self) -> tuple[str, str, str]:
        """(prefix, suffix, middle) markers as they appear in a prompt that a client wrapped itself."""
        return self.text or (self.prefix, self.suffix, self.middle)


# One row per marker set, most specific first (a vocabulary matches the first row whose three markers it has).
TEMPLATES: tuple[FimTemplate, ...] = (
    FimTemplate("qwen2.5-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|im_end|>"), bos=False),
    FimTemplate("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
                ("<|endoftext|>", "<fim_pad>", "<file_sep>", "<filename>"), bos=False),
    FimTemplate("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", ("▁<EOT>", "</s>"), bos=True,
                text=("<PRE> ", " <SUF>", " <MID>")),
    FimTemplate("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>",
                ("<｜end▁of▁sentence｜>", "<|EOT|>"), bos=True),
)


@dataclass(frozen=True)
class FimTokens:
    """A template resolved against one tokenizer's vocabulary: the ids to assemble and to stop on."""

    template: FimTemplate
    prefix_id: int
    suffix_id: int
    middle_id: int
    stop_ids: tuple[int, ...]
    bos_id: int | None  # None when the template wants no BOS or the tokenizer has none

    @property
    def special_tokens(self) -> int:
        """Marker (and BOS) tokens a prompt spends besides prefix and suffix."""
        return 3 + (self.bos_id is not None)


def detect_fim(tokenizer: Vocabulary, bos_id: int | None = None) -> FimTokens | None:
    """The FIM markers `tokenizer` holds (first matching TEMPLATES row), or None without a full set.

    bos_id: the tokenizer's BOS id (e.g. `tokenizer.bos_token_id`), used by templates trained with it.
    The markers being in the vocabulary says the tokenizer has them, not that the model was trained on them.
    """
    vocab = tokenizer.get_vocab()
    for t in TEMPLATES:
        if all(m in vocab for m in (t.prefix, t.suffix, t.middle)):
            return FimTokens(t, vocab[t.prefix], vocab[t.suffix], vocab[t.middle],
                             tuple(vocab[s] for s in t.stops if s in vocab), bos_id if t.bos else None)
    return None


@dataclass(frozen=True)
class FimBudget:
    max_prompt_tokens: int = 1024  # the whole prompt, markers included
    max_suffix_share: float = 0.25  # of the tokens left beside the markers (Continue: 0.25, later 0.2)

    def __post_init__(self):
        if self.max_prompt_tokens < 1 or not 0 <= self.max_suffix_share <= 1:
            raise ValueError(f"invalid FIM budget {self}")

    def suffix_tokens(self, fim: FimTokens) -> int:
        """The most suffix tokens a prompt holds: its share of the tokens beside `fim`'s markers."""
        return int((self.max_prompt_tokens - fim.special_tokens) * self.max_suffix_share)


@dataclass(frozen=True)
class FimPrompt:
    ids: list[int]
    prefix_tokens: int  # prefix tokens kept (its last ones)
    suffix_tokens: int  # suffix tokens kept (its first ones)
    dropped_prefix: int
    dropped_suffix: int


def fim_prompt(fim: FimTokens, prefix_ids: Sequence[int], suffix_ids: Sequence[int],
               budget: FimBudget = FimBudget()) -> FimPrompt:
    """The PSM prompt for the text before the cursor (`prefix_ids`) and after it (`suffix_ids`),
    both tokenized without special tokens; ValueError when the budget cannot hold the markers."""
    usable = budget.max_prompt_tokens - fim.special_tokens
    if usable < 1:
        raise ValueError(f"max_prompt_tokens {budget.max_prompt_tokens} leaves no room beside "
                         f"{fim.special_tokens} FIM marker tokens")
    n_suffix = min(len(suffix_ids), budget.suffix_tokens(fim))
    n_prefix = min(len(prefix_ids), usable - n_suffix)
    prefix = list(prefix_ids[len(prefix_ids) - n_prefix:])
    suffix = list(suffix_ids[:n_suffix])
    ids = ([fim.bos_id] if fim.bos_id is not None else []) + [fim.prefix_id, *prefix, fim.suffix_id, *suffix,
                                                               fim.middle_id]
    return FimPrompt(ids, n_prefix, n_suffix, len(prefix_ids) - n_prefix, len(suffix_ids) - n_suffix)


@dataclass(frozen=True)
class FimText:
    """A text prompt a client wrapped in FIM markers itself, split back into the text around the cursor."""

    template: str  # the TEMPLATES row whose markers it used
    prefix: str
    suffix: str


def split_fim_text(prompt: str) -> FimText | None:
    """`prompt` as prefix and suffix when it is `<prefix marker> P <suffix marker> S <middle marker> M`
    in any TEMPLATES row's text markers (whatever model is served), else None.

    Text before the prefix marker (a BOS, a client's file name or snippets of other files) is dropped:
    the repository is in memory. M (a middle the client already began) continues the prefix.
    """
    for t in TEMPLATES:
        pre, suf, mid = t.text_markers
        start = prompt.find(pre)
        hole = prompt.find(suf, start + len(pre)) if start >= 0 else -1
        end = prompt.rfind(mid)
        if start >= 0 and hole >= 0 and end >= hole + len(suf):
            return FimText(t.name, prompt[start + len(pre):hole] + prompt[end + len(mid):],
                           prompt[hole + len(suf):end])
    return None
