#!/usr/bin/env bash
# On the GPU machine, after unpack.sh has brought every part: rebuild and convert the GGUF, then
# train RECIPE from START for TRAIN_MIN minutes; checkpoints come back as float16 deltas as they are
# written (a returned file may hold 16 MiB; the float32 delta is 29 MB), then passkey on the GPU.
#   RECIPE=finetune/configs/retrieval-gpu-short.toml TRAIN_MIN=6 SAVE=50 bash bench/device/train.sh
# START: the delta to continue (default: the shipped default's, its LoRA pairs continued as adapters).
# $OUT: train.log, metrics.jsonl, ck-first.safetensors, ck-last.safetensors (until the final one),
# final.safetensors, meta.tar (each delta's adapter.json, the run config, passkey logs and results).
# Back here, each delta's adapter.json names the device's base: point base_model and base_fingerprint
# at the local converted base (same config and weights; tokenizer files serialised by another
# transformers, so the fingerprint differs) before using it (BENCHMARKS.md, "GPU run 1").
set -u
T0=$(date +%s)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
RECIPE=${RECIPE:-finetune/configs/retrieval-gpu.toml}
M=/tmp/outmeta; mkdir -p $M
pack() { tar -cf $OUT/meta.tar -C $M . 2>/dev/null; }
cat /tmp/parts/gguf.part-* > /tmp/model.gguf
echo "$(cat /tmp/parts/gguf.sha256)  /tmp/model.gguf" | sha256sum -c - || exit 3
python3 -m longllama_lsp.cli convert /tmp/model.gguf --out /tmp/untrained --force 2>&1 | tail -1
START=${START:-longllama_lsp/data/default-memory}
mkdir -p /tmp/start && cp $START/adapter.safetensors /tmp/start/
START=$START python3 - <<'PY'
import json, os
from longllama_lsp.model.loading import model_fingerprint
d = json.load(open(os.path.join(os.environ["START"], "adapter.json")))
d["base_model"], d["base_fingerprint"] = "/tmp/untrained", model_fingerprint("/tmp/untrained")
json.dump(d, open("/tmp/start/adapter.json", "w"), indent=1)
print("base fingerprint", d["base_fingerprint"])
PY
echo "base ready at +$(( $(date +%s) - T0 )) s"
python3 -m longllama_lsp.cli train $RECIPE --out /tmp/run -o 'model.path="/tmp/start"' \
  -o train.max_minutes=$TRAIN_MIN -o train.save_every=${SAVE:-50} ${EXTRA:-} > $OUT/train.log 2>&1 &
TRAIN=$!
seen=""; first=""
while kill -0 $TRAIN 2>/dev/null; do
  sleep 10
  cp /tmp/run/metrics.jsonl $OUT/metrics.jsonl 2>/dev/null
  last=$(ls -d /tmp/run/checkpoints/step-*[0-9] 2>/dev/null | tail -1)
  if [ -n "$last" ] && [ "$last" != "$seen" ] && [ -f "$last/delta/adapter.safetensors" ]; then
    name=first; [ -n "$first" ] && name=last
    python3 bench/device/cast.py "$last/delta" "$OUT/ck-$name.safetensors" "$M/ck-$name-$(basename $last).json" && seen=$last
    [ -z "$first" ] && first=$last
    ls $M/ck-last-*.json 2>/dev/null | head -n -1 | xargs -r rm -f
    pack
  fi
done
wait $TRAIN; echo "train rc $? at +$(( $(date +%s) - T0 )) s"
grep -v Warning $OUT/train.log | tail -3
cp /tmp/run/metrics.jsonl $OUT/metrics.jsonl; cp /tmp/run/train_config.toml $M/ 2>/dev/null
python3 bench/device/cast.py /tmp/run $OUT/final.safetensors $M/final.json && rm -f $OUT/ck-last.safetensors && echo "final delta saved"
pack
# passkey on the GPU: the server's selection at 16k and 64k, then dense at 64k (logged as it comes)
for spec in "2048 16384,65536" "0 65536"; do
  set -- $spec
  timeout ${EVAL_S:-70} python3 -m longllama_lsp.cli eval --task passkey --model /tmp/run --device ${DEVICE:-cuda} \
    --passkey-lengths $2 --passkey-trials 8 --select-tokens $1 --json $M/pk-sel$1.json > $M/pk-sel$1.log 2>&1
  grep -v Warning $M/pk-sel$1.log | tail -3
  pack
  echo "passkey select $1 done at +$(( $(date +%s) - T0 )) s"
done
