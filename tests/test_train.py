"""Training: objective vs a float64 reference, parameter groups / schedules, loss going down, FSDP2 on 2
processes vs 1, SIGTERM -> checkpoint -> --resume reproducing the uninterrupted losses, stage hand-off and
the inference export. Tiny preset on CPU (fp32), tiny random datasets written in the prepared format."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.dit import TTTDiT
from ttt_video.ttt_core.training import objective, optim
from ttt_video.ttt_core.training.checkpoint import latest_checkpoint
from ttt_video.ttt_core.training.config import load_config
from ttt_video.ttt_core.training.data import (
    BatchPrefetcher,
    LatentVideoDataset,
    StepBatches,
    epoch_permutation,
    host_threads_for_gpu_process,
    sample_generator,
    write_dataset_info,
    write_item,
    write_manifest,
)
from ttt_video.ttt_core.training.trainer import METRICS_NAME, drop_text, previous_changed, train_stage

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_dataset(root: Path, segments: int, n_items: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    frames = 13 + 12 * (segments - 1)
    records = []
    for i in range(n_items):
        mean = torch.randn(frames, 4, 8, 12, generator=g)
        logvar = torch.full_like(mean, -4.0) + 0.5 * torch.rand(mean.shape, generator=g)
        text = torch.randn(segments, 16, 32, generator=g)
        records.append(write_item(root, f"v{i}", torch.cat([mean, logvar], 1), text, store_dtype=torch.float32))
    write_manifest(root / "manifest.jsonl", records)
    write_dataset_info(root, {"scaling_factor": 0.7, "latent_channels": 4})
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "root": root,
        "d1": make_dataset(root / "d1", 1, 4, seed=1),
        "d3": make_dataset(root / "d3", 3, 2, seed=2),
    }


def overrides(manifest, ckpt_dir, steps=6, **extra):
    items = {
        "data.manifest": json.dumps(str(manifest)),
        "checkpoint.dir": json.dumps(str(ckpt_dir)),
        "stage.steps": str(steps),
        "optimizer.lr": "1e-3",  # big enough that every step moves the weights measurably
        "optimizer.lr_ttt": "1e-3",
        "optimizer.lr_end": "1e-4",
        "optimizer.warmup_steps": "1",
        "logging.tensorboard": "false",
        "checkpoint.interval": "0",
    }
    items.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in items.items()]


def losses(ckpt_dir: Path) -> list[float]:
    lines = (Path(ckpt_dir) / METRICS_NAME).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def read_model(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((ckpt / "model").glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------------------------------
# objective, groups, schedules
# --------------------------------------------------------------------------------------------------
def test_zero_snr_schedule_and_v_target_match_float64_reference():
    # official ZeroSNRDDPMDiscretization: sqrt-linear betas, then sqrt(alphas_cumprod) shifted and scaled so
    # that the last one is 0 and the first unchanged
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    s = torch.cumprod(1 - betas, 0).sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    ref = s**2
    acp = objective.zero_snr_alphas_cumprod()
    assert torch.allclose(acp, ref, rtol=1e-6, atol=1e-9) and acp[-1] == 0

    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 13, 4, 8, 12, generator=g), torch.randn(4, 13, 4, 8, 12, generator=g)
    t = torch.tensor([0, 250, 998, 999])
    x_t, v = objective.noise_and_target(x0, noise, t)
    a = ref[t].sqrt().view(-1, 1, 1, 1, 1)
    sig = (1 - ref[t]).sqrt().view(-1, 1, 1, 1, 1)
    assert torch.allclose(x_t.double(), a * x0.double() + sig * noise.double(), atol=1e-5)
    assert torch.allclose(v.double(), a * noise.double() - sig * x0.double(), atol=1e-5)
    assert torch.allclose(x_t[3], noise[3]) and torch.allclose(v[3], -x0[3])  # terminal step: pure noise


def test_trainable_sets_groups_and_schedules(data):
    model = TTTDiT(preset("tiny"))
    names = [n for n, _ in model.named_parameters()]
    qkvo = optim.apply_trainable(model, "ttt_qkvo")
    assert "transformer_blocks.0.attn1.to_q.weight" in qkvo and "transformer_blocks.1.attn1.to_out.0.bias" in qkvo
    assert "transformer_blocks.0.attn1.norm_k.weight" in qkvo and "transformer_blocks.0.ttt_gates.forward_text" in qkvo
    assert "transformer_blocks.0.ff.net.0.proj.weight" not in qkvo and "proj_out.weight" not in qkvo
    assert set(optim.apply_trainable(model, "all")) == set(names)

    cfg = load_config(TINY / "3s.toml", [f"data.manifest={json.dumps(str(data['d1']))}", "stage.steps=100"])
    opt, sched, schedules, group_names = optim.build_optimizer(model, cfg)
    groups = dict(zip([s.name for s in schedules], group_names))
    assert "transformer_blocks.0.ttt_gates.backward_video" in groups["ttt_wd"]  # gates decay (official)
    assert "transformer_blocks.0.ttt.ttt_norm_weight" in groups["ttt_no_wd"]
    assert "transformer_blocks.0.ttt.b1" in groups["ttt_no_wd"] and "transformer_blocks.0.ttt.W1" in groups["ttt_wd"]
    assert "transformer_blocks.0.attn1.to_q.bias" in groups["other_no_wd"]
    assert sum(len(v) for v in group_names) == len(names)
    assert cfg.warmup_steps == 2  # 2 % of 100
    ttt = schedules[[s.name for s in schedules].index("ttt_wd")]
    other = schedules[[s.name for s in schedules].index("other_wd")]
    assert ttt(0) == pytest.approx(0.5) and ttt(1) == pytest.approx(1.0)
    mid = 2 + 49  # half-way through the decay: cosine at its midpoint
    assert ttt(mid) * 1e-4 == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 49 / 98)))
    assert ttt(100) * 1e-4 == pytest.approx(1e-5)
    assert other(50) == pytest.approx(1.0)  # 1e-5 -> 1e-5: flat after warm-up
    lrs = []
    for _ in range(3):
        lrs.append(sched.get_last_lr()[[s.name for s in schedules].index("ttt_wd")])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5e-4) and lrs[1] == pytest.approx(1e-4)


@pytest.mark.parametrize("model", ["cogvideox-5b", "tiny"])
def test_shipped_stage_configs_follow_the_paper(model):
    table = {"3s": (1, 5000, "all", 1e-4), "9s": (3, 5000, "ttt_qkvo", 1e-5), "18s": (6, 1000, "ttt_qkvo", 1e-5),
             "30s": (10, 500, "ttt_qkvo", 1e-5), "63s": (21, 250, "ttt_qkvo", 1e-5)}  # fmt: skip
    previous = None
    for name, (segments, steps, trainable, lr_ttt) in table.items():
        cfg = load_config(REPO / "configs" / model / f"{name}.toml")
        assert (cfg.stage.segments, cfg.stage.trainable, cfg.optimizer.lr_ttt) == (segments, trainable, lr_ttt)
        assert cfg.model.preset == model and cfg.optimizer.lr == 1e-5 and cfg.optimizer.lr_end == 1e-5
        assert (cfg.optimizer.betas, cfg.optimizer.weight_decay, cfg.optimizer.grad_clip) == ([0.9, 0.95], 1e-4, 0.1)
        assert cfg.optimizer.warmup_fraction == 0.02 and cfg.data.text_dropout == 0.1
        if model == "cogvideox-5b":
            assert cfg.stage.steps == steps and cfg.precision.mixed == "bf16"
            assert cfg.memory.scan_checkpoint_group_size == 16
        if previous is not None:  # each stage starts from the previous stage's checkpoint folder
            assert cfg.model.init_from == [previous]
        previous = cfg.checkpoint.dir


def test_text_dropout_zeros_or_empty_prompt_per_video():
    text = torch.randn(3, 16, 32)
    null = torch.randn(16, 32)
    kept = [torch.equal(drop_text(text, sample_generator(0, 0, j), 0.1, None), text) for j in range(2000)]
    assert 0.08 < 1 - sum(kept) / len(kept) < 0.12  # ~10 % of videos lose their text
    dropped = next(j for j, k in enumerate(kept) if not k)
    assert torch.equal(drop_text(text, sample_generator(0, 0, dropped), 0.1, None), torch.zeros_like(text))
    empty = drop_text(text, sample_generator(0, 0, dropped), 0.1, null)
    assert all(torch.equal(empty[i], null) for i in range(3))  # every segment gets the empty prompt


def test_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    model = TTTDiT(preset("tiny", scan_checkpoint_group_size=0)).train()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 13, 4, 8, 12, generator=g)
    text = torch.randn(2, 1, 16, 32, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([300, 700])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    history = []
    for _ in range(20):
        opt.zero_grad()
        loss = objective.v_prediction_loss(model, x0, text, noise, t)
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.75 * history[0], history
    assert sum(b < a for a, b in zip(history, history[1:])) >= 17, history  # (almost) every step lowers it


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(data):
    """Uninterrupted 1-process run, 6 steps, global batch 2 (2 per process)."""
    ckpt = data["root"] / "ref"
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, **{"data.batch_size": 2, "checkpoint.interval": 2}))
    summary = train_stage(cfg)
    return ckpt, summary


@pytest.fixture(scope="module")
def accum_run(data):
    """1 process, batch 1 x 2 accumulation steps, stopped after 3 of 6 steps (final checkpoint at 3)."""
    ckpt = data["root"] / "accum"
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, **{"data.batch_size": 1, "data.grad_accum_steps": 2}))
    summary = train_stage(cfg, max_steps=3)
    return ckpt, summary


def test_single_process_run_checkpoint_and_export(reference_run):
    ckpt, summary = reference_run
    assert summary["end_step"] == 6 and len(losses(ckpt)) == 6
    final = latest_checkpoint(ckpt)
    assert final.name == "step_00000006"
    # interval 2, keep 2: step 2 was pruned, nothing half-written is left
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(("step_", ".tmp"))) == ["step_00000004", "step_00000006"]
    files = [p for p in final.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files)  # nothing pickled
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["samples_seen"] == 12 and state["world_size"] == 1

    # the export = TTT + every changed parameter (3-s stage: all); loads through the Model Loader path
    from ttt_video.ttt_core.loading import load_ttt_dit

    base = TTTDiT(preset("tiny"))
    folder = final.parent / "base"
    from ttt_video.ttt_core.loading import save_ttt_dit

    save_ttt_dit(base, folder / "model.safetensors")
    loaded = load_ttt_dit(folder / "model.safetensors", ttt_weights=ckpt / "export.safetensors", dtype=torch.float32)
    trained = read_model(final)
    for name, p in loaded.state_dict().items():
        assert torch.allclose(p, trained[name], rtol=1e-2, atol=1e-2), name  # bf16 export
    # and the checkpoint's model folder itself loads as a model
    direct = load_ttt_dit(final / "model", dtype=torch.float32)
    assert all(torch.equal(p, trained[n]) for n, p in direct.state_dict().items())


def test_two_process_fsdp_matches_one_process(data, reference_run, accum_run):
    ref_ckpt, _ = reference_run
    ckpt = data["root"] / "fsdp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ttt_video.ttt_core.training.cli", "train", "--config", str(TINY / "3s.toml"),
           "--max-steps", "3"]  # fmt: skip
    for o in overrides(data["d1"], ckpt, **{"data.batch_size": 1}):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    two, one = losses(ckpt), losses(ref_ckpt)[:3]
    assert len(two) == 3
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)
    state = json.loads((latest_checkpoint(ckpt) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 6
    # same weights after 3 steps as the 1-process run (sharded over 2 ranks, gathered by the checkpoint)
    a, b = read_model(latest_checkpoint(ckpt)), read_model(latest_checkpoint(accum_run[0]))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in a)
    assert any(not torch.equal(a[n], read_model(latest_checkpoint(ref_ckpt))[n]) for n in a)  # (not step 6)


def test_gradient_accumulation_matches_a_bigger_batch(reference_run, accum_run):
    (ref_ckpt, _), (ckpt, summary) = reference_run, accum_run
    assert summary["end_step"] == 3 and latest_checkpoint(ckpt).name == "step_00000003"
    assert not (ckpt / "export.safetensors").exists()  # the stage is not finished: no export yet
    assert losses(ckpt) == pytest.approx(losses(ref_ckpt)[:3], rel=1e-5, abs=1e-7)


def test_sigterm_checkpoint_and_resume_reproduce_losses(data, reference_run):
    ref_ckpt, _ = reference_run
    ckpt = data["root"] / "killed"
    cmd = [sys.executable, "-m", "ttt_video.ttt_core.training.cli", "train", "--config", str(TINY / "3s.toml")]
    for o in overrides(data["d1"], ckpt, **{"data.batch_size": 2}):
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    out = []
    for line in proc.stdout:  # the banner is printed just before the first step
        out.append(line)
        if line.startswith("stage 3s:"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    out.append(rest)
    assert proc.returncode == 0, "".join(out)[-3000:]
    stopped = latest_checkpoint(ckpt)
    k = json.loads((stopped / "trainer_state.json").read_text())["step"]
    assert 1 <= k < 6 and "SIGTERM" in "".join(out)
    assert not (ckpt / "export.safetensors").exists()

    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, **{"data.batch_size": 2}))
    with pytest.raises(FileExistsError, match="--resume"):
        train_stage(cfg)  # never silently starts over in a folder with checkpoints
    summary = train_stage(cfg, resume=True)
    assert summary["start_step"] == k and summary["end_step"] == 6
    assert losses(ckpt) == pytest.approx(losses(ref_ckpt), rel=1e-6, abs=1e-7)
    a, b = read_model(latest_checkpoint(ckpt)), read_model(latest_checkpoint(ref_ckpt))
    assert all(torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-7) for n in b)


def test_stage_handoff_to_9s(data, reference_run):
    ref_ckpt, _ = reference_run
    ckpt = data["root"] / "9s"
    extra = {"model.init_from": json.dumps([str(ref_ckpt)])}
    cfg = load_config(TINY / "9s.toml", overrides(data["d3"], ckpt, steps=2, **extra))
    assert cfg.stage.segments == 3 and cfg.stage.trainable == "ttt_qkvo"
    summary = train_stage(cfg)
    assert summary["end_step"] == 2 and math.isfinite(summary["last"]["loss"])
    before, after = read_model(latest_checkpoint(ref_ckpt)), read_model(latest_checkpoint(ckpt))
    for name in before:
        trainable = optim.is_trainable(name, "ttt_qkvo")
        same = torch.equal(before[name], after[name])
        if not trainable:
            assert same, f"frozen {name} changed"
    moved = [n for n in before if optim.is_trainable(n, "ttt_qkvo") and not torch.equal(before[n], after[n])]
    assert any(".ttt." in n for n in moved) and any(".attn1.to_q." in n for n in moved)
    state = json.loads((latest_checkpoint(ckpt) / "trainer_state.json").read_text())
    assert set(state["changed"]) == set(before)  # the 3-s stage changed everything: the export keeps it all
    from ttt_video.ttt_core.loading import open_weights

    assert set(open_weights(ckpt / "export.safetensors").refs) == set(before)
    assert previous_changed([str(ckpt / "export.safetensors")]) == set(before)

    bad = load_config(TINY / "9s.toml", overrides(data["d1"], data["root"] / "9s-bad", steps=2, **extra))
    with pytest.raises(ValueError, match="no item has 3 segment"):
        train_stage(bad)


def test_device_script_runs_on_cpu_with_tiny_preset(tmp_path):
    """scripts/device_train.sh (the 5B timing run) end to end on CPU with the tiny preset."""
    env = {**ENV, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/device_train.sh", "tiny", "ttt_qkvo", "2"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["end_step"] == 2 and summary["tokens_per_sample"] == 13 * 24 + 16
    assert summary["trainable_params"] < summary["total_params"]
    assert "| mean step time" in proc.stdout and "| tokens/s (mean)" in proc.stdout
    assert not (tmp_path / "work" / "run" / "latest").exists()  # timing run: no checkpoint written


# --------------------------------------------------------------------------------------------------
# batches built ahead of the step (background thread)
# --------------------------------------------------------------------------------------------------
def _inline_reference(ds, seed, step, rank, B, A, world, p_drop, null):
    """The step's inputs as the trainer's loop built them inline: sample (seed, step, j), epoch permutations."""
    n, global_batch = len(ds), B * A * world
    out = []
    for m in range(A):
        parts = []
        for b in range(B):
            j = rank * B * A + m * B + b
            pos = step * global_batch + j
            gen = sample_generator(seed, step, j)
            lat, txt = ds.load(epoch_permutation(n, seed, pos // n)[pos % n], gen)
            t = torch.randint(0, objective.NUM_TRAIN_TIMESTEPS, (1,), generator=gen)
            noise = torch.randn(lat.shape, generator=gen)
            parts.append((lat, drop_text(txt, gen, p_drop, null), noise, t))
        out.append([torch.stack([q[i] for q in parts]) if i < 3 else torch.cat([q[3] for q in parts]) for i in range(4)])
    return out


def test_prefetched_batches_are_the_inline_samples(data):
    ds = LatentVideoDataset(data["d1"], 1, expect_channels=4, expect_text=(16, 32))
    null = torch.randn(16, 32)
    seed = int(torch.randint(0, 1000, ()))
    # rank 1 of 2, 2 x 2 accumulation: global batch 8 over 4 items, so every step spans two epochs
    make = StepBatches(ds, seed, 1, 2, 2, 2, 0.5, null, objective.NUM_TRAIN_TIMESTEPS)
    with BatchPrefetcher(make, range(3, 9), depth=2) as pf:
        for step in range(3, 9):
            got = pf.get(step)
            ref = _inline_reference(ds, seed, step, 1, 2, 2, 2, 0.5, null)
            assert len(got) == 2
            for mb, (lat, txt, noise, t) in zip(got, ref):
                assert torch.equal(mb.latents, lat) and torch.equal(mb.text, txt)
                assert torch.equal(mb.noise, noise) and torch.equal(mb.timesteps, t)
    assert not pf._thread.is_alive()


def _finishes(fn, seconds=20.0):
    """Run fn on a watchdog thread: (finished in time, exception or None)."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001
            box["err"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box.get("err")


def test_prefetcher_error_surfaces_in_the_consumer_and_close_stops_it(data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(data["d1"].parent, root)
    ds = LatentVideoDataset(root / "manifest.jsonl", 1)
    (ds.items[2].vid_emb).write_bytes(b"not safetensors" * 10)  # every step of global batch 4 reads all 4 items
    make = StepBatches(ds, 0, 0, 4, 1, 1, 0.0, None, objective.NUM_TRAIN_TIMESTEPS)
    pf = BatchPrefetcher(make, range(5), depth=2)
    ok, err = _finishes(lambda: pf.get(0))
    assert ok, "get() hung on a failed loader thread"
    assert isinstance(err, ValueError) and "not a readable safetensors file" in str(err)
    assert any("data-loading thread" in n for n in getattr(err, "__notes__", []))
    assert _finishes(lambda: pf._thread.join(5))[0] and not pf._thread.is_alive()

    # a producer far ahead of its consumer, blocked on the full queue: close() ends it promptly
    pf = BatchPrefetcher(lambda step: torch.full((3,), float(step)), range(10**6), depth=2)
    assert torch.equal(pf.get(0), torch.zeros(3)) and torch.equal(pf.get(1), torch.ones(3))
    with pytest.raises(RuntimeError, match="out of order"):
        pf.get(5)
    pf.close()
    assert not pf._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        pf.get(3)


def test_loader_error_stops_training_with_the_error(data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(data["d1"].parent, root)
    for item in LatentVideoDataset(root / "manifest.jsonl", 1).items:
        item.vid_emb.write_bytes(b"\0" * 64)
    before = {t.ident for t in threading.enumerate()}
    cfg = load_config(TINY / "3s.toml", overrides(root / "manifest.jsonl", tmp_path / "run", **{"data.batch_size": 2}))
    with pytest.raises(ValueError, match="not a readable safetensors file"):  # (SIGTERM handler: main thread)
        train_stage(cfg)
    assert latest_checkpoint(tmp_path / "run") is None
    left = [t for t in threading.enumerate() if t.ident not in before and t.name == "batch-prefetch"]
    assert not left, "the loader thread outlived the failed run"


def test_host_thread_count_for_gpu_processes():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert host_threads_for_gpu_process({"OMP_NUM_THREADS": "3"}) is None  # the user's (or torchrun's) choice
    assert host_threads_for_gpu_process({}) == max(1, min(8, cores))
    assert host_threads_for_gpu_process({"LOCAL_WORLD_SIZE": "64"}) == max(1, min(8, cores // 64))
    assert 1 <= host_threads_for_gpu_process({"LOCAL_WORLD_SIZE": "2"}) <= 8



def test_time_budget_shortens_the_stage_and_anneals_to_its_new_end(data):
    # a budget already spent when the plan is made (after the first step, which compiles, and
    # TIME_PLAN_AFTER_STEPS steady ones) leaves one more step
    from ttt_video.ttt_core.training.trainer import TIME_PLAN_AFTER_STEPS

    ckpt = data["root"] / "budget"
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, steps=40, **{"data.batch_size": 1, "stage.max_minutes": 1e-4}))
    summary = train_stage(cfg)
    planned = 1 + TIME_PLAN_AFTER_STEPS + 1
    assert summary["end_step"] == summary["planned_steps"] == planned
    rows = [json.loads(line) for line in (ckpt / METRICS_NAME).read_text().splitlines()]
    assert len(rows) == planned
    lrs = [r["lr/other_wd"] for r in rows]
    assert lrs[-1] == pytest.approx(1e-4)  # lr_end: the schedule was re-planned to end at the new last step
    assert lrs[TIME_PLAN_AFTER_STEPS] > 5e-4  # (before the re-plan it was decaying over 40 steps)
    assert (ckpt / "export.safetensors").is_file()  # a finished stage: exported for the next one
    state = json.loads((latest_checkpoint(ckpt) / "trainer_state.json").read_text())
    assert state["planned_steps"] == planned

    # a budget that is not binding changes nothing
    roomy = data["root"] / "roomy"
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], roomy, steps=12, **{"data.batch_size": 1, "stage.max_minutes": 60}))
    assert train_stage(cfg)["end_step"] == 12 and (roomy / "export.safetensors").is_file()


def _slow_steps(monkeypatch, steps: set[int], seconds: float) -> None:
    """Make the given (1-based) training steps ``seconds`` slower on the trainer's clock (batch 1, no
    accumulation: one loss a step). The clock is advanced, not slept on, so the test is fast and the step
    times it sets dominate whatever the machine's real step time is."""
    from ttt_video.ttt_core.training import trainer

    real_loss, calls, offset = trainer.v_prediction_loss, [], [0.0]

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def perf_counter():
            return time.perf_counter() + offset[0]

    def slow(*a, **k):
        calls.append(1)
        if len(calls) in steps:
            offset[0] += seconds
        return real_loss(*a, **k)

    monkeypatch.setattr(trainer, "time", Clock())
    monkeypatch.setattr(trainer, "v_prediction_loss", slow)


def test_time_plan_ignores_profiled_steps(data, monkeypatch):
    # the device run of 2026-11-23 planned from a window holding the profiled steps and ended its stages at a
    # tenth of their budget: profiled steps (4-6 here, made 5 s slower) must not reach the plan
    from ttt_video.ttt_core.training.profiling import PROFILE_AFTER_STEPS
    from ttt_video.ttt_core.training.trainer import TIME_PLAN_AFTER_STEPS

    profiled = set(range(PROFILE_AFTER_STEPS + 1, PROFILE_AFTER_STEPS + 4))
    _slow_steps(monkeypatch, profiled, 5.0)
    ckpt = data["root"] / "budget-profiled"
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, steps=40, **{
        "data.batch_size": 1, "stage.max_minutes": 1e-4, "logging.profile_steps": 3}))  # fmt: skip
    summary = train_stage(cfg)
    first_plan = summary["time_plans"][0]
    assert first_plan["at_step"] == 1 + TIME_PLAN_AFTER_STEPS + len(profiled)  # 10 steady steps were timed
    assert first_plan["per_step_s"] < 2.5  # the profiled steps took over 5 s each
    assert summary["end_step"] == first_plan["at_step"] + 1  # the budget was spent: one more step


def test_time_plan_gives_back_steps_a_slow_start_took(data, monkeypatch):
    # steps 2-11 are slow (a cold start), the rest fast: the first plan is pessimistic, the re-plan lengthens it
    from ttt_video.ttt_core.training import trainer

    monkeypatch.setattr(trainer, "REPLAN_EVERY", 5)
    _slow_steps(monkeypatch, set(range(2, 12)), 5.0)
    ckpt = data["root"] / "budget-replan"
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, steps=30, **{
        "data.batch_size": 1, "stage.max_minutes": 110 / 60, "logging.log_every": 100}))  # fmt: skip
    summary = train_stage(cfg)
    first, second = summary["time_plans"][:2]
    assert first["at_step"] == 11 and second["at_step"] == 16
    assert first["per_step_s"] > 5 and second["per_step_s"] < 2.5  # timed from the fast steps since the first plan
    assert first["planned_steps"] < 24 and second["planned_steps"] > first["planned_steps"]
    assert summary["end_step"] == summary["planned_steps"] > first["planned_steps"]
    assert (ckpt / "export.safetensors").is_file()
    lrs = [json.loads(line)["lr/other_wd"] for line in (ckpt / METRICS_NAME).read_text().splitlines()]
    assert lrs[-1] == pytest.approx(1e-4)  # still annealed to lr_end at the (re-planned) last step


def test_profiled_steps_write_a_report(data):
    from ttt_video.ttt_core.training.profiling import PROFILE_AFTER_STEPS

    ckpt = data["root"] / "profiled"
    steps = PROFILE_AFTER_STEPS + 2
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, steps=steps, **{"data.batch_size": 1, "logging.profile_steps": 2}))
    train_stage(cfg)
    summary = json.loads((ckpt / "profile.json").read_text())
    assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    assert summary["aten_calls_per_step"] > 50  # a DiT step runs hundreds of aten ops (forward, backward, AdamW)
    text = (ckpt / "profile.txt").read_text()
    assert "aten::" in text and "self host time" in text
    assert len(losses(ckpt)) == steps  # profiling does not change the run


def test_deferred_metrics_match_per_step_logging_and_catch_a_nan(data, reference_run, monkeypatch):
    # the device is synchronised only at log points: every step is still in metrics.jsonl, with the same losses
    ref_ckpt, _ = reference_run
    ckpt = data["root"] / "sparse-log"
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, **{"data.batch_size": 2, "logging.log_every": 4}))
    train_stage(cfg)
    rows = [json.loads(line) for line in (ckpt / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert losses(ckpt) == pytest.approx(losses(ref_ckpt), rel=1e-6, abs=1e-7)
    assert all(r["step_time_s"] > 0 and math.isfinite(r["grad_norm"]) for r in rows)

    # a non-finite loss between log points still stops the run, naming its step
    from ttt_video.ttt_core.training import trainer

    real, calls = trainer.v_prediction_loss, []

    def nan_at_third(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(trainer, "v_prediction_loss", nan_at_third)
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], data["root"] / "nan", **{"data.batch_size": 2, "logging.log_every": 5}))
    with pytest.raises(FloatingPointError, match="at step 3"):
        train_stage(cfg)
    assert latest_checkpoint(data["root"] / "nan") is None


def test_two_processes_plan_the_same_time_budgeted_end(data):
    # each rank measures its own step times and clock: they must still agree on the last step (or hang)
    from ttt_video.ttt_core.training.trainer import TIME_PLAN_AFTER_STEPS

    ckpt = data["root"] / "fsdp-budget"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ttt_video.ttt_core.training.cli", "train", "--config", str(TINY / "3s.toml")]  # fmt: skip
    for o in overrides(data["d1"], ckpt, steps=40, **{"data.batch_size": 1, "stage.max_minutes": 1e-4, "logging.log_every": 5}):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(losses(ckpt)) == 1 + TIME_PLAN_AFTER_STEPS + 1 and (ckpt / "export.safetensors").is_file()


def test_a_failing_profile_report_does_not_stop_training(data, monkeypatch):
    from ttt_video.ttt_core.training import profiling
    from ttt_video.ttt_core.training.profiling import PROFILE_AFTER_STEPS

    def broken(*a, **k):
        raise RuntimeError("profiler output format changed")

    monkeypatch.setattr(profiling, "write_report", broken)
    ckpt = data["root"] / "profile-fails"
    steps = PROFILE_AFTER_STEPS + 2
    cfg = load_config(TINY / "3s.toml", overrides(data["d1"], ckpt, steps=steps, **{"data.batch_size": 1, "logging.profile_steps": 1}))
    summary = train_stage(cfg)
    assert summary["end_step"] == steps and (ckpt / "export.safetensors").is_file()
