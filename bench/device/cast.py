"""Copy a delta dir's adapter as float16 into DST and its adapter.json (without the tensor list) into META:
    python3 bench/device/cast.py RUN_OR_DELTA_DIR OUT/final.safetensors META/final.json
float16 is what ships, and it fits the 16 MiB a file returned from a device call may have."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

src, dst, meta_dst = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
t = load_file(str(src / "adapter.safetensors"))
save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in t.items()}, str(dst),
          metadata={"format": "longllama-delta"})
meta = json.loads((src / "adapter.json").read_text())
meta.pop("tensors", None)
meta_dst.write_text(json.dumps(meta, indent=1))
