"""Run kernel_checks.check on given seeds under several KERNEL_CONFIG specs (is a bad draw the kernel's or the
inputs'?): prints each spec's errors per seed. Usage: seed_compare.py B H N G 'spec1;spec2' seed..."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "gpu"))
import torch  # noqa: E402
from kernel_checks import check  # noqa: E402

from ttt_video.kernels import ttt_triton  # noqa: E402

B, H, N, G = map(int, sys.argv[1:5])
specs = sys.argv[5].split(";")
base = {k: dict(v) for k, v in ttt_triton.KERNEL_CONFIG.items()}
for seed in map(int, sys.argv[6:]):
    for spec in specs:
        for k, v in base.items():
            ttt_triton.KERNEL_CONFIG[k] = dict(v)
        ttt_triton.apply_config_spec(spec)
        e = check("mlp", B, H, N, 64, 64, G, torch.bfloat16, "cuda", seed=seed)
        print(seed, f"{spec:28s}", " ".join(f"{k}={e[k]:.1e}" for k in ("out", "final_W2", "dk", "dW1", "dln_weight")),
              flush=True)
