"""The toy-world VAE trainer (ttt_core/toyworld/vae_train.py): data from training seeds only, learning on a
fixed batch, the saved diffusers folder (shapes, scaling factor), refusals, resume, the renderer pool."""

import json

import numpy as np
import pytest
import torch

from ttt_video.ttt_core.toyworld import vae_train
from ttt_video.ttt_core.toyworld.dataset import TRAIN_SEEDS
from ttt_video.ttt_core.toyworld.vae_train import (
    ClipPool,
    build_vae,
    check_clip_frames,
    palette_accuracy,
    palette_tensor,
    render_clips,
    to_model_input,
    train_vae,
    vae_config,
    vae_losses,
)
from ttt_video.ttt_core.toyworld.world import palette

FAST = dict(batch_size=1, clip_frames=9, device="cpu", workers=0, log_every=1, eval_clips=2)


def _fresh_seed() -> int:
    return int(np.random.default_rng().integers(0, 10_000))


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_clips_come_from_training_seeds_and_are_palette_frames(monkeypatch):
    seen = []
    real = vae_train.generate_story
    monkeypatch.setattr(vae_train, "generate_story", lambda s, k: seen.append(s) or real(s, k))
    task = (_fresh_seed(), 3, 9, (64, 96), 12)
    clips = render_clips(task)
    assert clips.shape == (12, 9, 64, 96, 3) and clips.dtype == np.uint8
    assert seen and all(TRAIN_SEEDS.start <= s < TRAIN_SEEDS.stop for s in seen)
    colours = {tuple(rgb) for _, _, rgb in palette().values()}
    assert {tuple(c) for c in np.unique(clips.reshape(-1, 3), axis=0)} <= colours
    np.testing.assert_array_equal(render_clips(task), clips)  # deterministic in the task
    assert not np.array_equal(render_clips((task[0], 4, 9, (64, 96), 12)), clips)


def test_clip_frames_must_give_an_odd_latent_count():
    for ok in (9, 17, 49):
        assert check_clip_frames(ok) == ok
    for bad in (1, 5, 13, 16):  # 13 frames = 4 latents: the decoder would return 16 frames
        with pytest.raises(ValueError, match="8 m \\+ 1"):
            check_clip_frames(bad)


def test_palette_accuracy():
    colours, foreground = palette_tensor(torch.device("cpu"))
    x = to_model_input(torch.from_numpy(render_clips((_fresh_seed(), 0, 9, (64, 96), 2))))
    assert palette_accuracy(x, x, colours, foreground) == (1.0, 1.0)
    acc, fg = palette_accuracy(x + 0.05 * torch.randn_like(x), x, colours, foreground)  # ~6 RGB units: same colours
    assert acc > 0.99 and fg > 0.99
    acc, fg = palette_accuracy(torch.zeros_like(x), x, colours, foreground)  # all mid-gray: only the cat is right
    assert acc < 0.5


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(_fresh_seed())
    vae = build_vae(vae_config()).train()
    x = to_model_input(torch.from_numpy(render_clips((_fresh_seed(), 0, 9, (64, 96), 1))))
    # the trainer's optimizer settings (train_vae: AdamW betas (0.9, 0.99), gradient clipping at 1.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, betas=(0.9, 0.99))

    def mode_l1():
        with torch.no_grad():
            return float((vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean())

    before = mode_l1()
    # Measured over random seeds (session 8): the error after the last of 24 steps alone was above 0.8 of the
    # start in 3 of 53 runs (0.86, 0.89, 1.74: transient spikes, with or without clipping; one failed CI); the best
    # of the evaluations after steps 16, 20 and 24 (with the trainer's clipping) was 0.33-0.62 in 24 of 24 runs.
    after = []
    for step in range(1, 25):
        loss = vae_losses(vae, x, 1e-6, _no_autocast)[0]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step >= 16 and step % 4 == 0:
            after.append(mode_l1())
    assert min(after) < 0.8 * before, (before, after)


def test_saved_folder_loads_and_codes_a_49_frame_clip(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    out = tmp_path / "vae"
    summary = train_vae(out, steps=2, seed=_fresh_seed(), checkpoint_every=0, print_fn=lambda m: None, **FAST)
    assert not out.with_name("vae.partial").exists()
    assert {p.name for p in out.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors", "metrics.jsonl",
                                               "train_vae.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1.0 / summary["eval"]["latent_std"])
    assert config["scaling_factor"] != 1.0
    assert config["block_out_channels"] == [4, 8, 16, 32] and config["latent_channels"] == 8
    assert not config["use_quant_conv"] and not config["use_post_quant_conv"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    vae = AutoencoderKLCogVideoX.from_pretrained(str(out), use_safetensors=True).eval()
    assert vae.config.scaling_factor == pytest.approx(config["scaling_factor"])
    assert next(vae.parameters()).dtype == torch.float32
    clip = render_clips((_fresh_seed(), 0, 49, (64, 96), 1))
    with torch.no_grad():
        z = vae.encode(to_model_input(torch.from_numpy(clip))).latent_dist.mode()
        assert z.shape == (1, 8, 13, 8, 12)
        assert vae.decode(z).sample.shape == (1, 3, 49, 64, 96)

    # an existing folder is refused (and left alone) without force
    before = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        train_vae(out, steps=1, print_fn=lambda m: None, **FAST)
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not out.with_name("vae.partial").exists()


def test_cli_refuses_an_existing_out_dir(tmp_path, capsys):
    from ttt_video.ttt_core import cli

    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code = cli.main(["toyworld", "train-vae", "--out", str(out), "--steps", "1", "--batch-size", "1",
                     "--clip-frames", "9", "--device", "cpu"])
    assert code == 1
    assert "exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data" and not (tmp_path / "mine.partial").exists()


class _Killed(Exception):
    pass


def test_resume_continues_the_step_count(tmp_path):
    out = tmp_path / "vae"
    seed = _fresh_seed()

    def kill_at_step_3(message):
        if message.startswith("step 3/"):
            raise _Killed

    with pytest.raises(_Killed):
        train_vae(out, steps=4, seed=seed, checkpoint_every=2, print_fn=kill_at_step_3, **FAST)
    partial = tmp_path / "vae.partial"
    assert (partial / "checkpoint" / "state.json").is_file() and not out.exists()
    assert json.loads((partial / "checkpoint" / "state.json").read_text())["step"] == 2
    with pytest.raises(FileExistsError, match="--resume"):  # an unfinished run is not silently discarded
        train_vae(out, steps=4, seed=seed, print_fn=lambda m: None, **FAST)

    messages = []
    summary = train_vae(out, steps=4, seed=seed, checkpoint_every=2, resume=True, print_fn=messages.append, **FAST)
    assert any(m.startswith("resuming") and "at step 2" in m for m in messages)
    assert [m.split()[1] for m in messages if m.startswith("step ")] == ["3/4", "4/4"]
    assert summary["steps"] == 4
    # the lines the killed run logged past its checkpoint are replaced, not duplicated
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not partial.exists()


def test_renderer_pool_with_worker_processes():
    pool = ClipPool(6, 9, (64, 96), torch.device("cpu"), seed=_fresh_seed(), first_task=0, workers=1, per_step=2,
                    clips_per_task=4)
    try:
        pool.refresh(block_until_full=True)
        assert pool.filled == 6 and pool.take_received() >= 6
        batch = pool.sample(3)
        assert batch.shape == (3, 9, 64, 96, 3) and batch.dtype == torch.uint8
        assert int(pool.clips.reshape(6, -1).amax(1).min()) > 0  # every slot holds a rendered clip
    finally:
        pool.close()
