"""Passkey retrieval, the paper's long-context probe (Fig. 1; prompt from Landmark Attention, as in
LongLLaMA's examples/passkey.py).

A pass key (a number) hides at a random depth inside filler text; the prompt ends with the question.
The whole prompt goes through the model the reference way (windows of `model.window` tokens; all but
the last `last_context_length` tokens end up in the memory layers' memory), then greedy decoding
answers. A trial passes when the generated text contains the key. Without working memory a model
can only answer when the key is in its last local window, which random depths rarely allow.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ASK_QUESTION = "What is the pass key?"  # as a user types it to `longllama ask`
QUESTION = f"{ASK_QUESTION} The pass key is"


def passkey_prompt(n_filler_chars: int, rng: random.Random) -> tuple[str, str]:
    """(prompt, key): the reference generator, with `n_filler_chars` characters of filler in all."""
    prefix_chars = rng.randint(0, n_filler_chars)
    repeats = n_filler_chars // len(FILLER) + 2
    filler = " ".join([FILLER] * repeats)
    key = str(rng.randint(1, 50000))
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    lines = [TASK, filler[:prefix_chars], info, filler[: n_filler_chars - prefix_chars], QUESTION]
    return "\n".join(lines), key


def filler_chars_for(tokenizer: Any, target_tokens: int) -> int:
    """Filler characters that make a prompt of about `target_tokens` tokens for this tokenizer."""
    sample = " ".join([FILLER] * 200)
    chars_per_token = len(sample) / len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    overhead = len(tokenizer("\n".join([TASK, "The pass key is 12345. Remember it. 12345 is the pass key.",
                                        QUESTION]), add_special_tokens=False)["input_ids"])
    return max(0, int((target_tokens - overhead) * chars_per_token))


@dataclass
class PasskeyResult:
    target_tokens: int
    trials: int
    correct: int
    prompt_tokens: list[int] = field(default_factory=list)  # actual length of each trial's prompt
    depths: list[float] = field(default_factory=list)  # key position / prompt length, per trial
    answers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


@torch.no_grad()
def run_passkey(model: Any, tokenizer: Any, target_tokens: int, trials: int, seed: int = 0,
                max_new_tokens: int = 10, progress: bool = True) -> PasskeyResult:
    """Accuracy over `trials` prompts of about `target_tokens` tokens (same seed: same prompts)."""
    rng = random.Random(f"passkey-{target_tokens}-{seed}")
    n_chars = filler_chars_for(tokenizer, target_tokens)
    result = PasskeyResult(target_tokens, trials, 0)
    start = time.perf_counter()
    for i in range(trials):
        prompt, key = passkey_prompt(n_chars, rng)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)  # (1, T)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        result.correct += key in answer
        result.prompt_tokens.append(int(ids.shape[1]))
        result.depths.append(round(prompt.index(f"The pass key is {key}.") / len(prompt), 3))
        result.answers.append(answer.strip())
        if progress:
            print(f"passkey {target_tokens} trial {i + 1}/{trials}: key {key} -> {answer.strip()!r}",
                  file=sys.stderr, flush=True)
    result.seconds = round(time.perf_counter() - start, 2)
    return result
