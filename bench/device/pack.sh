#!/usr/bin/env bash
# Pack what a lent GPU machine needs to train the default model, in parts that each fit one device
# call (the working tree travels too: ~21 MiB of the 64 MiB a call may carry):
#   DIR/p1: the wheels the GPU image lacks (tree-sitter and grammars, gguf, detect-secrets, ...) and
#           the bundled GGUF's first third;  DIR/p2, DIR/p3: the other thirds (+ sha256 in p3).
# The device has no network: the model must come this way (a 98 MB Q4_1 GGUF; converted there).
#   bash bench/device/pack.sh .dev        # DIR must be ignored by git (.git/info/exclude)
set -euo pipefail
dir=${1:?usage: pack.sh DIR}
gguf=$(python3 -c "from longllama_lsp.resolve import find_bundled_gguf; print(find_bundled_gguf())")
rm -rf "$dir"/p1 "$dir"/p2 "$dir"/p3 && mkdir -p "$dir"/p1/whl "$dir"/p2 "$dir"/p3
# versions as installed here; cp312 wheels for the GPU image's Python 3.12
pins=$(python3 -m pip list --format=freeze 2>/dev/null | grep -iE '^(tree[-_]sitter[-_a-z]*|gguf|detect[-_]secrets|pygls|lsprotocol|cattrs|watchdog|sqlite[-_]utils|sqlite[-_]fts4|click[-_]default[-_]group)==')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dir"/p1/whl $pins
sha256sum "$gguf" | cut -d' ' -f1 > "$dir"/p3/gguf.sha256
split -n 3 -d "$gguf" "$dir"/gguf.part-
mv "$dir"/gguf.part-00 "$dir"/p1/ && mv "$dir"/gguf.part-01 "$dir"/p2/ && mv "$dir"/gguf.part-02 "$dir"/p3/
du -sh "$dir"/p1 "$dir"/p2 "$dir"/p3
