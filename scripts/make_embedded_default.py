"""Build the embedded default TTT-DiT: models/embedded-default/{transformer,scheduler,model_index.json}.

A fixed-seed, UNTRAINED tiny TTT-DiT (config preset "tiny" with CogVideoX's 226-token text budget and TTT mini-batch 64) in the diffusers CogVideoX folder layout, so
`ttt-video generate` and the ComfyUI nodes run out of the box on a CPU. It makes noise, not a cartoon,
until the toy-world issue trains it and replaces transformer/. The tiny tokenizer, text encoder and VAE
next to it come from scripts/build_embedded_assets.py.

    python scripts/make_embedded_default.py [--out models/embedded-default] [--seed 20250407] [--force]

Deterministic: the same seed gives byte-identical weights (checked with --check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SEED = 20250407  # paper's arXiv month; any fixed number would do
TEXT_TOKENS = 226
MINI_BATCH = 64

MODEL_INDEX = {
    "_class_name": "CogVideoXPipeline",
    "_diffusers_version": "0.42.1",
    "_ttt_video": {
        "transformer_class": "ttt_video.ttt_core.dit.TTTDiT",
        "note": "embedded default: fixed-seed UNTRAINED tiny TTT-DiT; it makes noise until trained weights ship",
    },
    "scheduler": ["diffusers", "CogVideoXDPMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["ttt_video", "TTTDiT"],
    "vae": ["diffusers", "AutoencoderKLCogVideoX"],
}


def build_model(seed: int):
    sys.path.insert(0, str(REPO.parent))
    from ttt_video.ttt_core.config import preset
    from ttt_video.ttt_core.dit import TTTDiT

    torch.manual_seed(seed)
    # CogVideoX's 226-token text budget per segment (the tiny preset's 16 would reject every real storyboard
    # paragraph) and the paper's TTT-MLP mini-batch of 64 (4x fewer sequential scan steps than the tiny
    # preset's 16: a one-minute CPU run is ~2x faster); everything else is the tiny preset.
    model = TTTDiT(preset("tiny", max_text_seq_length=TEXT_TOKENS, mini_batch_size=MINI_BATCH)).eval()
    return model


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write(out: Path, seed: int, force: bool) -> None:
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO.parent))
    from ttt_video.ttt_core.sampling import COGVIDEOX_SCHEDULER_CONFIG

    tdir = out / "transformer"
    if (tdir / "diffusion_pytorch_model.safetensors").exists() and not force:
        raise SystemExit(f"{tdir} exists; pass --force to rebuild it")
    model = build_model(seed)
    tdir.mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.update({"_ttt_video_class": "ttt_video.ttt_core.dit.TTTDiT (CogVideoX transformer keys + TTT keys)", "_ttt_video_seed": seed,
                "_note": "UNTRAINED fixed-seed tiny model: makes noise"})
    _atomic_write_text(tdir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=tdir, prefix=".tmp-")
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt", "ttt_video_config": model.config.to_json(),
                                    "note": "embedded default: UNTRAINED, makes noise"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, tdir / "diffusion_pytorch_model.safetensors")
    sched = {"_class_name": "CogVideoXDPMScheduler", "_diffusers_version": "0.42.1", **COGVIDEOX_SCHEDULER_CONFIG}
    _atomic_write_text(out / "scheduler" / "scheduler_config.json", json.dumps(sched, indent=2, sort_keys=True) + "\n")
    _atomic_write_text(out / "model_index.json", json.dumps(MODEL_INDEX, indent=2) + "\n")
    n = sum(p.numel() for p in model.parameters())
    digest = hashlib.sha256((tdir / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]
    print(f"wrote {out} (tiny TTT-DiT, {n:,} parameters, seed {seed}, sha256 {digest}); it is UNTRAINED and makes noise")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "embedded-default")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--force", action="store_true", help="rebuild even if the transformer exists")
    args = ap.parse_args(argv)
    write(args.out, args.seed, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
