"""Assemble a toy-world model folder (the embedded default) in the diffusers CogVideoX layout.

    models/embedded-default/
        model_index.json  scheduler/  tokenizer/  text_encoder/   (copied from --base)
        vae/              (--vae: a folder written by `ttt-video toyworld train-vae`; default: --base's)
        transformer/      config.json + diffusion_pytorch_model.safetensors (one file)

The transformer comes from ``--transformer``: a training checkpoint (``runs/.../step_N`` or its ``model/``
folder, or a stage's checkpoint.dir, whose newest checkpoint is taken), anything ``ttt_core.loading``
reads, or nothing: then a fixed-seed UNTRAINED model of preset "toyworld" (makes noise; the tests' fallback).

    python scripts/make_embedded_default.py --out DIR [--transformer CKPT] [--vae DIR] [--base DIR]
        [--dtype fp32|bf16] [--note TEXT] [--force]

The shipped embedded default was made with (docs/toyworld.md, "Training"):
    python scripts/make_embedded_default.py --out models/embedded-default --force \
        --transformer <ttt 63-s checkpoint> --vae <trained vae> --note "..."  (fp32, the dtype it was evaluated in)
Nothing is overwritten without --force; each file is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SEED = 20250407  # paper's arXiv month; any fixed number would do
UNTRAINED_NOTE = "embedded default: fixed-seed UNTRAINED toyworld TTT-DiT; it makes noise"
COPIED = ("tokenizer", "text_encoder", "scheduler")

MODEL_INDEX = {
    "_class_name": "CogVideoXPipeline",
    "_diffusers_version": "0.42.1",
    "_ttt_video": {"transformer_class": "ttt_video.ttt_core.dit.TTTDiT"},
    "scheduler": ["diffusers", "CogVideoXDPMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["ttt_video", "TTTDiT"],
    "vae": ["diffusers", "AutoencoderKLCogVideoX"],
}


def _import_package():
    if "ttt_video" not in sys.modules:
        sys.path.insert(0, str(REPO.parent))


def _resolve_checkpoint(path: Path) -> Path:
    """A stage dir -> its newest checkpoint's model/ folder; a step_N dir -> its model/ folder."""
    _import_package()
    from ttt_video.ttt_core.training.checkpoint import is_checkpoint, latest_checkpoint

    if path.is_dir() and not (path / "config.json").is_file():
        if not is_checkpoint(path):
            newest = latest_checkpoint(path)
            if newest is None:
                raise SystemExit(f"{path}: no checkpoint in it")
            path = newest
        path = path / "model"
    return path


def build_transformer(source: Path | None, seed: int):
    _import_package()
    from ttt_video.ttt_core.config import preset
    from ttt_video.ttt_core.dit import TTTDiT
    from ttt_video.ttt_core.loading import load_ttt_dit

    if source is None:
        torch.manual_seed(seed)
        return TTTDiT(preset("toyworld")).eval()
    return load_ttt_dit(_resolve_checkpoint(source), dtype=torch.float32).eval()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _copy_folder(src: Path, dst: Path, ignore=None) -> None:
    if src.resolve() == dst.resolve():
        return
    if not src.is_dir():
        raise SystemExit(f"{src} is not a folder")
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".tmp-{dst.name}-"))
    shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=ignore)
    os.chmod(tmp, 0o755)
    old = dst.with_name(f".old-{dst.name}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def write(out: Path, *, transformer: Path | None, vae: Path | None, base: Path, dtype: str, note: str | None,
          seed: int, force: bool) -> None:
    from safetensors.torch import save_file

    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    if weights.exists() and not force:
        raise SystemExit(f"{weights} exists; pass --force to replace it")
    model = build_transformer(transformer, seed)
    note = note or (UNTRAINED_NOTE if transformer is None else f"trained toyworld TTT-DiT from {transformer}")
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        _copy_folder(base / name, out / name)
    # the model files only: train-vae's logs and summary stay with its run (docs/device-logs keeps them)
    _copy_folder(vae if vae is not None else base / "vae", out / "vae",
                 ignore=shutil.ignore_patterns("*.jsonl", "train_vae.json", "checkpoint*"))
    tdir = out / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.update({"_ttt_video_class": "ttt_video.ttt_core.dit.TTTDiT (CogVideoX transformer keys + TTT keys)",
                "_note": note})
    if transformer is None:
        cfg["_ttt_video_seed"] = seed
    _atomic_write_text(tdir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    store = torch.bfloat16 if dtype == "bf16" else torch.float32
    state = {k: v.detach().to(store).contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=tdir, prefix=".tmp-")
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt", "ttt_video_config": model.config.to_json(), "note": note})
    os.chmod(tmp, 0o644)
    os.replace(tmp, weights)
    index = json.loads(json.dumps(MODEL_INDEX))
    index["_ttt_video"]["note"] = note
    index["_ttt_video"]["trained"] = transformer is not None
    _atomic_write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")
    n = sum(p.numel() for p in model.parameters())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    print(f"wrote {out}: TTT-DiT {n:,} parameters ({dtype}, sha256 {digest}), global layer "
          f"{model.config.global_layer}; {note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "embedded-default")
    ap.add_argument("--transformer", type=Path, default=None, help="trained weights (checkpoint or model folder)")
    ap.add_argument("--vae", type=Path, default=None, help="VAE folder (default: --base's vae/)")
    ap.add_argument("--base", type=Path, default=REPO / "models" / "embedded-default",
                    help="folder whose tokenizer/, text_encoder/, scheduler/ (and vae/) are copied")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="stored transformer dtype")
    ap.add_argument("--note", default=None, help="model note (shown by the loader)")
    ap.add_argument("--seed", type=int, default=SEED, help="seed of the untrained fallback")
    ap.add_argument("--force", action="store_true", help="replace an existing transformer")
    args = ap.parse_args(argv)
    write(args.out, transformer=args.transformer, vae=args.vae, base=args.base, dtype=args.dtype, note=args.note,
          seed=args.seed, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
