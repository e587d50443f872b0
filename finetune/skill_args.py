"""`longllama eval --task` options, apart from finetune/skill_eval.py so building the CLI parser
never imports torch (`longllama status` and a no-op `index` stay fast)."""

TASKS = ("crossfile-ids", "passkey", "guard")
PROMPT_STYLES = ("reference", "ask", "bare")  # --passkey-prompt (finetune/skill_eval.passkey_trials)


def add_arguments(p) -> None:
    """`longllama eval --task` options (the perplexity mode's --repo, --model, --json are shared)."""
    p.add_argument("--task", default="perplexity", choices=("perplexity", "skill", *TASKS),
                   help="perplexity (default): memory conditions as above; crossfile-ids: NLL/top-1 of "
                        "cross-file identifier tokens with repository memory, retrieved memory (with and without the kNN "
                        "lookup), none and BM25 snippets; "
                        "passkey: the probe with a memory bag; guard: perplexity without memory; "
                        "skill: all three (finetune/skill_eval.py)")
    p.add_argument("--budget", type=int, default=512, help="crossfile-ids: prompt tokens per span (default: 512)")
    p.add_argument("--span-len", type=int, default=128, help="crossfile-ids: scored tokens per span")
    p.add_argument("--chunk-len", type=int, default=256, help="memory chunk tokens (default: 256)")
    p.add_argument("--memory-tokens", type=int, default=8192,
                   help="crossfile-ids: memory per file of the 'memory' system (imported files first)")
    p.add_argument("--retrieve-tokens", type=int, default=4096, metavar="N",
                   help="crossfile-ids: memory of the 'retrieved' system, the chunks completions retrieve "
                        "(the server's memory.retrieveTokens; default: 4096)")
    p.add_argument("--memory-context", type=int, default=256, metavar="N",
                   help="crossfile-ids and passkey: each memory chunk is encoded after the N tokens before it, as "
                        "the index encodes chunks after the 1,024 characters before them (default: 256; 0: each "
                        "chunk alone, as indexes before stop 34)")
    from longllama_lsp.commands import mixture_weight
    from longllama_lsp.engine import EngineOptions

    p.add_argument("--knn-weight", type=mixture_weight, default=EngineOptions.knn_weight, metavar="W",
                   help="crossfile-ids: the 'knn' system's share of each token's distribution from the kNN lookup "
                        f"over the retrieved memory (the server's memory.knnWeight; default: {EngineOptions.knn_weight}; "
                        "0: as retrieved)")
    p.add_argument("--files-per-repo", type=int, default=6, help="crossfile-ids: files scored per repository")
    p.add_argument("--spans-per-file", type=int, default=2)
    p.add_argument("--passkey-lengths", default="4096,16384,65536")
    p.add_argument("--passkey-trials", type=int, default=8)
    p.add_argument("--passkey-prompt", default="reference", choices=PROMPT_STYLES,
                   help="passkey: what the model reads before answering. reference (default): the reference "
                        "prompt's last --local-len tokens; ask: `longllama ask \"What is the pass key?\"`'s chat "
                        "prompt, with the filler and key alone in memory (a folder of text files as a user indexes "
                        "it); bare: the question line alone, as at the top of a new file")
    p.add_argument("--local-len", type=int, default=None, help="passkey local window (default: the model's)")
    p.add_argument("--guard-windows", type=int, default=8, help="guard: windows per held-out file")
    from longllama_lsp.commands import int_at_least

    p.add_argument("--select-tokens", type=int_at_least(0), default=0, metavar="N",
                   help="memory tokens each query attends to: the top blocks within N, as the server's "
                        "memory.selectTokens (default 0: dense, every memory token)")
