"""Synthetic cross-document recall (the FoT paper's dictionary lookup, spec §4 Fig. 4), small enough
to train a tiny LongLLaMA on CPU in about a minute through the real FoT crossbatch loop.

    python -m finetune.recall_task --out tests/fixtures/recall-tiny      # train, evaluate, save

Prompt format the trained model understands (tests/fixtures/recall-tiny/README.md repeats it):

    memory (another file, any number of chunks)      prompt (the local window, ends at the cursor)
    -------------------------------------------      ---------------------------------------------
    badu = 164                                       import os
    bera = 907                                       badu =          <- greedy continuation " 164"
    # other lines are allowed                          (the prompt ends right after "=")
    dika = 560

Keys are the 128 lowercase consonant-vowel words of KEYS, values the 16 numbers of VALUES. Every
definition line "KEY = VALUE" is ONE token of the bundled tokenizer, and so is the query "KEY ="
and the answer " VALUE" (added tokens; any other text is byte-level BPE). A key's value is random
per document, so it can only come from memory: matching the query token against the definition
tokens in memory is exactly the memory layer's job, without the in-context induction circuit
(previous-token head + match) that a 2-layer model takes thousands of steps to grow. Definition
embeddings start as the sum of their query and answer embeddings (`build_model`).

Training data (`recall_batches`): packs of 2 rows of 64 tokens. Row 0 = definitions of fresh keys
(and filler lines), row 1 = queries "KEY =" + " VALUE" + newline for the same keys in another
order. In the memory layer row 1 sees row 0 as its positive and, with crossbatch range R, R−1 rows
of the previous pack (other keys) as negatives. The loss is on the query rows' values and newlines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
N_KEYS, N_VALUES = 128, 16
FILLER = ("# settings", "import os", "def run():", "    return None", "", "x = []", "# see above", "pass")
SEQ_LEN, PACK, BATCH = 64, 2, 8
SPECIALS = ("<pad>", "<s>", "</s>")


def key_names(n: int = N_KEYS, seed: int = 0) -> list[str]:
    words = ["".join(w) for w in itertools.product(CONSONANTS, VOWELS, CONSONANTS, VOWELS)]
    return sorted(random.Random(seed).sample(words, n))


def value_names(n: int = N_VALUES, seed: int = 0) -> list[str]:
    return [str(v) for v in sorted(random.Random(seed + 1).sample(range(100, 1000), n))]


KEYS, VALUES = key_names(), value_names()


def build_tokenizer():
    """Byte-level BPE (any text) + one added token per definition, query and answer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [line + "\n" for line in FILLER] + [f"x = {v}\n" for v in VALUES]
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=1, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    pieces = [f"{k} = {v}" for k in KEYS for v in VALUES] + [f"{k} =" for k in KEYS] + [f" {v}" for v in VALUES]
    tok.add_tokens([AddedToken(p, normalized=False) for p in pieces])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class Vocab:
    """Token ids of the task's pieces."""

    def __init__(self, tokenizer):
        def one(text: str) -> int:
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert len(ids) == 1, (text, ids)
            return ids[0]

        self.definition = {(k, v): one(f"{k} = {v}") for k in KEYS for v in VALUES}
        self.query = {k: one(f"{k} =") for k in KEYS}
        self.value = {v: one(f" {v}") for v in VALUES}
        self.nl = one("\n")
        self.filler = [tokenizer.encode(line + "\n", add_special_tokens=False) for line in FILLER]

    def define(self, key: str, value: str) -> list[int]:
        return [self.definition[key, value], self.nl]

    def ask(self, key: str, value: str) -> list[int]:
        return [self.query[key], self.value[value], self.nl]


def _row(vocab: Vocab, pairs: list[tuple[str, str]], rng: random.Random, n: int, filler: float, query: bool
         ) -> tuple[list[int], list[int], list[tuple[str, str]]]:
    """n+1 tokens of lines; returns ids, loss kinds (1 = an answer or its newline) and the pairs used."""
    ids: list[int] = []
    kinds: list[int] = []
    used = []
    for key, value in pairs:
        while rng.random() < filler:
            ids += rng.choice(vocab.filler)
            kinds += [0] * (len(ids) - len(kinds))
        line = vocab.ask(key, value) if query else vocab.define(key, value)
        if len(ids) + len(line) > n + 1:
            break
        ids += line
        kinds += [0, 1, 1] if query else [0, 0]
        used.append((key, value))
    pad = rng.choice(vocab.filler) * (n + 1)
    return (ids + pad)[: n + 1], (kinds + [0] * len(pad))[: n + 1], used


def recall_batches(tokenizer, batch_size: int = BATCH, seq_len: int = SEQ_LEN, seed: int = 0, filler: float = 0.1
                   ) -> Iterator[dict[str, Any]]:
    """Endless FoT batches (input_ids, target_ids, loss_mask: (B, T)) of definition/query packs."""
    vocab = Vocab(tokenizer)
    rng = random.Random(seed)
    per_row = seq_len // 2  # at most this many 2-token definition lines fit a row
    packs = batch_size // PACK
    if packs * per_row > len(KEYS):
        raise ValueError(f"{packs} packs of {per_row} keys need more than the {len(KEYS)} keys")
    while True:
        keys = rng.sample(KEYS, packs * per_row)  # disjoint over the batch: negatives never hold the answer
        rows, kinds = [], []
        for p in range(packs):
            pairs = [(k, rng.choice(VALUES)) for k in keys[p * per_row:(p + 1) * per_row]]
            d_ids, _, used = _row(vocab, pairs, rng, seq_len, filler, query=False)
            q_ids, q_kind, _ = _row(vocab, rng.sample(used, len(used)), rng, seq_len, filler, query=True)
            rows += [d_ids, q_ids]
            kinds += [[0] * len(d_ids), q_kind]
        ids = torch.tensor(rows)  # (B, T+1)
        yield {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:],
               "loss_mask": (torch.tensor(kinds)[:, 1:] == 1).float()}


def build_model(tokenizer, seed: int = 0, key_scale: float = 3.0):
    """2 layers, memory layer 0 (its keys are the definition tokens themselves), hidden 64, window 64,
    no RoPE in the memory layer (the paper's small-model setting, spec §1.1 mem_positionals).

    Initialization that makes a minute of CPU training enough (plain random init sits on the
    loss plateau of "values are uniform" for thousands of steps): embeddings N(0, 1) dominate the
    residual; a definition token's embedding starts as the sum of its query's and its answer's;
    the memory layer starts as "match by similarity, copy what matched" (`copy_friendly_init`).
    """
    from longllama_lsp.model import PRESETS, LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LongLlamaConfig(**{**PRESETS["tiny"], "vocab_size": len(tokenizer), "hidden_size": 64,
                             "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "num_hidden_layers": 2, "mem_layers": [0], "mem_positionals": False,
                             "max_position_embeddings": SEQ_LEN, "last_context_length": SEQ_LEN // 2,
                             "tie_word_embeddings": False, "initializer_range": 0.07,
                             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                             "pad_token_id": tokenizer.pad_token_id})
    model = LongLlamaForCausalLM(cfg)
    vocab = Vocab(tokenizer)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.normal_(0.0, 1.0)
        for (k, v), i in vocab.definition.items():
            emb[i] = emb[vocab.query[k]] + emb[vocab.value[v]]
    copy_friendly_init(model, key_scale)
    return model


@torch.no_grad()
def copy_friendly_init(model, key_scale: float = 3.0) -> None:
    """Memory layers start as "match by similarity, copy what matched": q_proj = k_proj (per GQA group),
    v_proj orthonormal and o_proj its transpose, so o(v(x)) is a projection of x. Training keeps v/o
    frozen (`train_recall`): with them trainable the copy path is lost before matching is learned."""
    cfg = model.config
    h, hkv, d, c = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    group = h // hkv
    for i in cfg.mem_layers:
        att = model.model.layers[i].self_attn
        att.k_proj.weight.mul_(key_scale)
        wk = att.k_proj.weight.view(hkv, d, c)
        att.q_proj.weight.copy_(wk.repeat_interleave(group, 0).reshape(h * d, c))
        wv = torch.linalg.qr(torch.randn(c, hkv * d))[0].T.contiguous()  # (Hkv·D, C), orthonormal rows
        att.v_proj.weight.copy_(wv)
        att.o_proj.weight.copy_(wv.view(hkv, d, c).repeat_interleave(group, 0).reshape(h * d, c).T / group)


@torch.no_grad()
def evaluate_recall(model, tokenizer, trials: int = 64, dict_rows: int = 1, distractor_rows: int = 2,
                    seed: int = 1234) -> dict[str, float]:
    """Accuracy of the answer after "KEY =" for keys defined only in memory, with and without memory.

    Each trial: `dict_rows` chunks of definitions (the "other file") + `distractor_rows` chunks of
    other keys' definitions, each chunk encoded independently with `model.encode_memory`; then one
    window of query lines for the defined keys, scored teacher-forced. Chance is 1/16.
    """
    from longllama_lsp.model import Memory

    model.eval()
    vocab = Vocab(tokenizer)
    rng = random.Random(seed)
    per_row = SEQ_LEN // 2
    hits = {"memory": 0, "none": 0}
    total = 0
    for _ in range(trials):
        keys = rng.sample(KEYS, (dict_rows + distractor_rows) * per_row)
        pairs = [(k, rng.choice(VALUES)) for k in keys]
        chunks, defined = [], []
        for r in range(dict_rows + distractor_rows):
            ids, _, used = _row(vocab, pairs[r * per_row:(r + 1) * per_row], rng, SEQ_LEN, 0.1, query=False)
            chunks.append(torch.tensor([ids[:SEQ_LEN]], device=model.device))
            defined += used if r < dict_rows else []
        memory = Memory.concat([model.encode_memory(c) for c in chunks])
        queries = rng.sample(defined, min(len(defined), SEQ_LEN // 3))
        window = torch.tensor([sum((vocab.ask(k, v) for k, v in queries), [])], device=model.device)
        at = torch.arange(0, window.shape[1], 3, device=model.device)  # query tokens; the answer follows
        want = window[0, at + 1]
        for name, mem in (("memory", memory), ("none", None)):
            logits = model(window, memory=mem, use_cache=False, last_context_length=window.shape[1]).logits
            hits[name] += int((logits[0, at].argmax(-1) == want).sum())
        total += len(at)
    return {"with_memory": hits["memory"] / total, "without_memory": hits["none"] / total, "queries": total,
            "chance": 1 / N_VALUES}


def train_recall(out_dir: Path, steps: int = 900, seed: int = 0, progress: bool = True):
    """Train a tiny model on recall_batches with the FoT loop; returns (model, tokenizer, cfg, result)."""
    from finetune.config import DataArgs, ModelArgs, RunConfig, TrainArgs
    from finetune.train import prepare_trainable, train_loop

    tokenizer = build_tokenizer()
    model = prepare_trainable(build_model(tokenizer, seed), ModelArgs(train="all"))
    for i in model.config.mem_layers:  # see copy_friendly_init
        model.model.layers[i].self_attn.v_proj.requires_grad_(False)
        model.model.layers[i].self_attn.o_proj.requires_grad_(False)
    # Positives only first (small d, as the paper advises), then negatives from the previous pack.
    data = DataArgs(seq_len=SEQ_LEN, batch_size=BATCH, pack=PACK, cross_batch_range=1,
                    d_schedule=[(min(100, steps // 3), 3)])
    cfg = RunConfig(model=ModelArgs(train="all"), data=data,
                    train=TrainArgs(out_dir=str(out_dir / "run"), steps=steps, lr=3e-3, warmup_steps=20,
                                    weight_decay=0.0, max_grad_norm=1.0, seed=seed, output="none",
                                    progress=progress, log_every=10))
    result = train_loop(model, lambda: recall_batches(tokenizer, BATCH, SEQ_LEN, seed), cfg)
    return result.model, tokenizer, cfg, result


README = """# recall-tiny: a tiny LongLLaMA that answers from memory

Made by `python -m finetune.recall_task --out tests/fixtures/recall-tiny` (finetune/recall_task.py,
seed {seed}, {steps} FoT crossbatch steps, {train_seconds} s on CPU). Weights are float16.
2 layers, hidden 64, memory layer 0 (no RoPE there), window 64, vocab {vocab}.

## Prompt format

Memory (e.g. another file of the repository, any number of chunks of <= 64 tokens):

    {k0} = {v0}
    {k1} = {v1}

Prompt (the local window, ending at the cursor, no trailing space):

    x = 1
    {k0} =

Greedy continuation: ` {v0}` then a newline. Keys are the 128 words of `recall_task.KEYS`
(lowercase consonant-vowel-consonant-vowel, e.g. {k0}, {k1}), values the 16 numbers of
`recall_task.VALUES` ({values}). A definition line `KEY = VALUE`, a query `KEY =` and an answer
` VALUE` are each a single token (added tokens); other text is byte-level BPE and may appear
around them (filler lines were mixed into training). Without memory the answer is a guess.

## Measured ({trials} trials: 1 chunk of 32 definitions + 2 chunks of 32 distractor definitions in memory)

| memory | accuracy of the answer token |
|---|---|
| with memory | {with_memory:.1%} |
| without memory | {without_memory:.1%} |
| chance | {chance:.1%} |
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("tests/fixtures/recall-tiny"))
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from finetune.outputs import save_output
    from longllama_lsp.model.loading import load_model, load_tokenizer

    t0 = time.perf_counter()
    model, tokenizer, cfg, result = train_recall(args.out, args.steps, args.seed)
    train_s = round(time.perf_counter() - t0, 1)
    metrics = (args.out / "run" / "metrics.jsonl").read_text()
    shutil.rmtree(args.out / "run", ignore_errors=True)
    save_output(model.half(), tokenizer, cfg, args.out, None, "full",
                extra={"train_seconds": train_s, "script": "finetune/recall_task.py"})
    (args.out / "train_metrics.jsonl").write_text(metrics)
    saved, tok = load_model(args.out), load_tokenizer(args.out)  # measure what was saved
    trials = 64
    acc = evaluate_recall(saved, tok, trials=trials)
    summary = {**acc, "steps": args.steps, "seed": args.seed, "train_seconds": train_s,
               "final_loss": result.losses[result.step]}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "README.md").write_text(README.format(
        **summary, trials=trials, vocab=len(tok), k0=KEYS[0], k1=KEYS[1], v0=VALUES[0], v1=VALUES[11],
        values=", ".join(VALUES[:4]) + ", ..."))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
