"""kernel_checks.check on given seeds under several KERNEL_CONFIG changes (is a bad draw a kernel's or the
inputs'?): prints each change's errors per seed. Usage (on the device, the repo importable as ttt_video):
    seed_compare.py B H N G 'mlp_fwd:mix=0|mlp_fwd:variant=gmem;mlp_bwd:variant=gmem' seed...
('|' between changes; each change is an apply_config_spec string.)"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "gpu"))
import torch  # noqa: E402
from kernel_checks import check  # noqa: E402

from ttt_video.kernels import ttt_triton  # noqa: E402

B, H, N, G = map(int, sys.argv[1:5])
specs = sys.argv[5].split("|")
base = {k: dict(v) for k, v in ttt_triton.KERNEL_CONFIG.items()}
for seed in map(int, sys.argv[6:]):
    for spec in specs:
        for k, v in base.items():
            ttt_triton.KERNEL_CONFIG[k] = dict(v)
        ttt_triton.apply_config_spec(spec)
        e = check("mlp", B, H, N, 64, 64, G, torch.bfloat16, "cuda", seed=seed)
        print(seed, f"{spec:40s}", " ".join(f"{k}={e[k]:.1e}" for k in ("out", "final_W2", "dk", "dW1", "dln_weight")),
              flush=True)
