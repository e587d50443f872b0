#!/bin/bash
# A trained checkpoint judged as issue 16's CPU runs 14-16 were (BENCHMARKS "CPU run 14"-"CPU run 16"):
#   bench/crossfile/checkpoint_eval.sh CKPT OUT [DATA]
# 1. cross-file identifier NLL, sample 1 (seed 0), one thread, beside 2.-3.;
# 2. the three eval repositories (DATA, default /work/data/eval: the unpacked wheels of requests 2.32.3,
#    flask 3.1.0, click 8.1.7) indexed with CKPT (~25 min on two busy cores; the hole runs copy the index);
# 3. completions on the first and seed-9 hole sets (120 holes), system d, one thread.
# Results in OUT: xid-seed0.json, first-d.json, seed9-d.json (+ .md, logs, times.txt). Compare with
#   python bench/crossfile/paired.py BASE-first-d.json:OUT/first-d.json BASE-seed9-d.json:OUT/seed9-d.json
set -euo pipefail
CKPT=${1:?usage: checkpoint_eval.sh CKPT OUT [DATA]}
OUT=${2:?usage: checkpoint_eval.sh CKPT OUT [DATA]}
DATA=${3:-/work/data/eval}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
stamp() { echo "$1 $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/times.txt"; }
stamp start
( OMP_NUM_THREADS=1 longllama eval --task crossfile-ids --model "$CKPT" \
    --repo "$DATA/requests" --repo "$DATA/flask" --repo "$DATA/click" \
    --budget 512 --span-len 128 --chunk-len 256 --memory-tokens 2048 --retrieve-tokens 4096 --memory-context 256 \
    --files-per-repo 3 --spans-per-file 3 --batch-size 4 --seed 0 --no-progress \
    --json "$OUT/xid-seed0.json" > "$OUT/xid.log" 2>&1
  stamp "xid done" ) &
for repo in requests flask click; do
  OMP_NUM_THREADS=1 longllama index --repo "$DATA/$repo" --model "$CKPT" -q --json > "$OUT/index-$repo.json"
done
stamp indexed
for set in first seed9; do
  holes="$HERE/holes.jsonl"; [ "$set" = first ] || holes="$HERE/holes-$set.jsonl"
  python "$HERE/run.py" --holes "$holes" --data "$DATA" --systems d --model "$CKPT" --threads 1 \
      --work "$OUT/work-$set" --json "$OUT/$set-d.json" --md "$OUT/$set-d.md" > "$OUT/$set.log" 2>&1
  stamp "$set done"
done
wait
stamp done
