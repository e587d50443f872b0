"""Bench only: kNN-LM (bench/knn/states.py) inside the language server that bench/crossfile/run.py starts.

    LONGLLAMA_KNN=0.3:0.5:64 LONGLLAMA_KNN_STORES=DIR PYTHONPATH=bench/knn python bench/crossfile/run.py ...

(lam:T:K; DIR holds states.py's store-<repo>.pt.) Python imports this file at start-up when its folder is on
PYTHONPATH (run.py passes PYTHONPATH on to the server). Every completion of a file under run.py's
`<work>/repos/<repo>/` mixes the kNN distribution into each decode step's logits, the datastore being that
repository's states less the completed file's own (its stored text holds the hole's answer). A measurement of
what the lookup on the last layer's FFN input does to completions; the product's lookup (longllama_lsp/knn.py,
memory.knnWeight, stop 43) uses the memory's own keys and values instead, which the index already keeps. Run
this hook with `--knn-weight 0` on run.py so that the two do not stack.
"""
import os

if os.environ.get("LONGLLAMA_KNN"):
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from states import Datastore, StateProbe  # noqa: E402

    from longllama_lsp import decode, engine  # noqa: E402
    from longllama_lsp.knn import mixture  # noqa: E402

    LAM, TEMP, K = (float(x) for x in os.environ["LONGLLAMA_KNN"].split(":"))
    STORES = Path(os.environ["LONGLLAMA_KNN_STORES"])
    _stores: dict[str, Datastore] = {}
    _now: dict[str, object] = {}  # "store", "allowed": the running completion's; "probe": the model's

    def _datastore(repo: str) -> Datastore:
        if repo not in _stores:
            _stores[repo] = Datastore(torch.load(STORES / f"store-{repo}.pt", weights_only=True))
        return _stores[repo]

    _complete = engine.Engine._complete

    def complete_with_knn(self, req, text, offset, path, *args, **kwargs):
        repo, rel = str(path).split("/repos/", 1)[1].split("/", 1)
        store = _datastore(repo)
        if "probe" not in _now:
            _now["probe"] = StateProbe(self._model)
        _now.update(store=store, allowed=store.others(rel))
        try:
            return _complete(self, req, text, offset, path, *args, **kwargs)
        finally:
            _now.pop("store")

    _step = decode.Decoder._step

    def step_with_knn(self, state, tokens, memory, attention, sources):
        out = _step(self, state, tokens, memory, attention, sources)
        store = _now.get("store")
        if store is not None:
            query = _now["probe"].states[0, -1:]  # (1, H): the newest position's state
            dist, rows = store.nearest(query, _now["allowed"], int(K))
            logp = torch.log_softmax(out.logits[0, -1:].float(), -1)
            out.logits[0, -1] = mixture(logp, dist, store.next_ids[rows], LAM, TEMP)[0].to(out.logits.dtype)
        return out

    engine.Engine._complete = complete_with_knn
    decode.Decoder._step = step_with_knn
