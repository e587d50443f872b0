#!/usr/bin/env bash
# On the GPU machine, once per part as it arrives (each call carries one part; the carried folder
# does not survive the next call, /tmp does): wheels into /tmp/site, GGUF parts into /tmp/parts.
#   bash bench/device/unpack.sh .dev/p1
set -euo pipefail
part=${1:?usage: unpack.sh DIR/pN}
mkdir -p /tmp/parts /tmp/site
cp "$part"/gguf.* /tmp/parts/
if [ -d "$part/whl" ]; then  # cp312 wheels: the GPU image's Python
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$part"/whl/*.whl
fi
ls -la /tmp/parts
