import json, sys, torch
sys.path.insert(0, "tests/gpu")
from kernel_checks import check
from ttt_video.kernels import ttt_triton as tt
base = {k: dict(v) for k, v in tt.KERNEL_CONFIG.items()}
for seed in (1579300558, 1613900243, 1399582675):
    for name, fwd, bwd in [("gluon one-CTA", dict(variant="smem", pair=0), dict(variant="smem", pair=0, bwd_group=9)),
                           ("gluon paired", dict(variant="smem", pair=2), dict(variant="smem", pair=2, bwd_group=9)),
                           ("triton gmem", dict(variant="gmem"), dict(variant="gmem"))]:
        tt.KERNEL_CONFIG.clear(); tt.KERNEL_CONFIG.update({k: dict(v) for k, v in base.items()})
        tt.KERNEL_CONFIG["mlp_fwd"].update(fwd); tt.KERNEL_CONFIG["mlp_bwd"].update(bwd)
        e = check("mlp", 1, 3, 1280, 64, 64, 3, torch.bfloat16, "cuda", seed=seed)
        print(json.dumps({"seed": seed, "kernels": name, "out": round(e["out"], 5), "max": round(max(e.values()), 5),
                          "worst": max(e, key=e.get)}), flush=True)
