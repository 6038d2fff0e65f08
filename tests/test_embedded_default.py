"""The shipped embedded default (models/embedded-default): trained toy-world weights, loadable, small, and a
short CPU generation with them draws the toy world's palette (its untrained initialisation does not)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ttt_video.ttt_core import pipeline
from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.storyboard import load_storyboard, parse_storyboard
from ttt_video.ttt_core.toyworld import score
from ttt_video.ttt_core.toyworld.vae_train import VAE_CONFIG

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "models" / "embedded-default"
ARCHITECTURE = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
                "text_embed_dim", "num_layers", "sample_width", "sample_height", "patch_size",
                "max_text_seq_length", "global_layer", "mini_batch_size", "mlp_expansion"}  # fmt: skip


@pytest.fixture(scope="module")
def maker(load_script):
    return load_script("scripts/make_embedded_default.py")


def test_shipped_files_are_the_trained_toyworld_model(maker):
    total = sum(p.stat().st_size for p in EMBEDDED.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024, f"embedded default is {total / 2**20:.1f} MB (> 30 MB)"
    index = json.loads((EMBEDDED / "model_index.json").read_text())
    assert index["_ttt_video"]["trained"] is True

    cfg = json.loads((EMBEDDED / "transformer" / "config.json").read_text())
    want = preset("toyworld").to_dict()
    assert {k: cfg[k] for k in ARCHITECTURE} == {k: want[k] for k in ARCHITECTURE}

    vae_cfg = json.loads((EMBEDDED / "vae" / "config.json").read_text())
    for k in ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
              "temporal_compression_ratio", "sample_height", "sample_width"):  # fmt: skip
        assert tuple(np.atleast_1d(vae_cfg[k])) == tuple(np.atleast_1d(VAE_CONFIG[k])), k
    assert vae_cfg["scaling_factor"] != VAE_CONFIG["scaling_factor"]  # set from the trained latents' std
    assert sorted(p.name for p in (EMBEDDED / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    # trained: every tensor finite, and far from the seeded initialisation the builder makes without weights
    shipped = load_file(str(EMBEDDED / "transformer" / "diffusion_pytorch_model.safetensors"))
    init = maker.build_transformer(None, seed=20250407).state_dict()
    assert shipped.keys() == init.keys()
    assert all(torch.isfinite(t).all() for t in shipped.values())
    moved = [k for k in shipped if not torch.allclose(shipped[k].float(), init[k].float(), atol=1e-3)]
    assert len(moved) > 0.9 * len(shipped), f"only {len(moved)} of {len(shipped)} tensors differ from the initialisation"


def test_embedded_default_loads_with_its_description():
    bundle = pipeline.load_model_bundle(None, device="cpu")
    assert bundle.is_embedded_default and "cat-and-mouse" in bundle.describe()
    assert bundle.config.global_layer == "ttt_mlp" and bundle.config.num_layers == preset("toyworld").num_layers


def _palette_fit(frames: np.ndarray) -> float:
    """Fraction of pixels within the scorer's colour distance of a palette colour."""
    labels = score.classify(frames)
    return float((labels < len(score.LABELS)).mean())


@pytest.fixture(scope="module")
def one_segment():
    board = load_storyboard(ROOT / "storyboards" / "preview_9s.txt")
    return parse_storyboard(board.segments[0].text)


def _generate(storyboard, model, tmp_path, name):
    res = pipeline.generate(storyboard, tmp_path / f"{name}.mp4", model=model, steps=6, seed=11, device="cpu",
                            return_frames=True)
    frames = (res.images.float().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    assert frames.shape == (49, 64, 96, 3) and (tmp_path / f"{name}.mp4").is_file()
    return frames


def test_short_cpu_generation_draws_the_toy_world(one_segment, tmp_path, maker):
    trained = _generate(one_segment, None, tmp_path, "trained")
    # the same folder with the untrained, seeded transformer: same VAE, same text encoder, same noise
    untrained_dir = tmp_path / "untrained"
    maker.write(untrained_dir, transformer=None, vae=None, base=EMBEDDED, dtype="fp32", note=None,
                         seed=20250407, force=False)
    untrained = _generate(one_segment, untrained_dir, tmp_path, "untrained")
    fit_trained, fit_untrained = _palette_fit(trained), _palette_fit(untrained)
    print(f"palette fit: shipped {fit_trained:.3f}, untrained {fit_untrained:.3f}", file=sys.stderr)
    assert fit_trained > fit_untrained + 0.05
    # frame-to-frame change stays small (no per-frame noise)
    assert score.score_frames(trained, one_segment).smoothness > 0.8
