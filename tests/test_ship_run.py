"""scripts/ship_toyworld_run.py: a device run's export becomes the shipped models and a logs folder, with the
shipped tensors checked against the export's (the check that catches shipping the wrong weights)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ship_mod(load_script):
    return load_script("scripts/ship_toyworld_run.py")


def _perturbed(src: Path, dst: Path, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).contiguous()
             for k, v in load_file(str(src)).items()}
    save_file(state, str(dst))
    return state


def _tar(path: Path, files: dict[str, bytes], mode: str) -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def setup(tmp_path):
    """A copy of the shipped models (the destination) and an export of a 'new run': the shipped transformers with
    fresh random changes, the shipped VAE, and a small report."""
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "embedded-default", models / "embedded-default")
    shutil.copytree(ROOT / "models" / "comparison", models / "comparison")
    export = tmp_path / "export"
    export.mkdir()
    ttt = _perturbed(models / "embedded-default" / "transformer" / "diffusion_pytorch_model.safetensors",
                     export / "transformer-ttt.safetensors", seed=1)
    shutil.copyfile(models / "embedded-default" / "transformer" / "config.json", export / "transformer-ttt.config.json")
    local_dir = models / "comparison" / "local-attention" / "transformer"
    _perturbed(local_dir / "diffusion_pytorch_model.safetensors", export / "transformer-local.safetensors", seed=2)
    shutil.copyfile(local_dir / "config.json", export / "transformer-local.config.json")
    vae = models / "embedded-default" / "vae"
    _tar(export / "vae.tar", {f"vae/{p.name}": p.read_bytes() for p in vae.iterdir()}, "w")
    _tar(export / "reports.tar.gz", {"metrics/ttt-63s.jsonl": b'{"step": 1, "loss": 0.5}\n' * 50,
                                     "logs/train-ttt-63s.log": b"step 1/1 loss 0.5\n",
                                     "eval/results.md": b"# table\n", "eval/ttt/eval_settings.json": b"{}",
                                     "eval/ttt/tw1.score.json": b'{"report": {}}', "eval/ttt/tw1.mp4": b"video"},
         "w:gz")
    (export / "full-tail.log").write_text("[06:00:00] eval-ttt: done in 1.0 s\n")
    return models, export, ttt, tmp_path


def test_an_export_becomes_the_shipped_models_and_a_logs_folder(ship_mod, setup):
    models, export, ttt, tmp_path = setup
    logs = tmp_path / "docs" / "run9"
    ship_mod.main(["--export", str(export), "--logs", str(logs), "--note", "ttt run nine", "--local-note",
                   "local run nine", "--models", str(models)])
    shipped = load_file(str(models / "embedded-default" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert shipped.keys() == ttt.keys() and all(torch.equal(shipped[k], ttt[k]) for k in ttt)
    local_dir = models / "comparison" / "local-attention" / "transformer"
    assert (local_dir / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (export / "transformer-local.safetensors").read_bytes()
    assert json.loads((local_dir / "config.json").read_text())["_note"] == "local run nine"
    index = json.loads((models / "embedded-default" / "model_index.json").read_text())
    assert index["_ttt_video"]["note"] == "ttt run nine" and index["_ttt_video"]["trained"] is True
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*") if p.is_file()) == [
        "eval-results.md", "full-tail.log", "logs/train-ttt-63s.log", "metrics/ttt-63s.jsonl.gz", "scores.tar.gz"]
    with tarfile.open(logs / "scores.tar.gz") as tar:  # the score records, not the videos
        assert sorted(tar.getnames()) == ["ttt/eval_settings.json", "ttt/tw1.score.json"]
    # the logs folder is not replaced silently
    with pytest.raises(SystemExit, match="exists"):
        ship_mod.main(["--export", str(export), "--logs", str(logs), "--note", "x", "--local-note", "y",
                       "--models", str(models)])


def test_an_unfinished_export_changes_nothing(ship_mod, setup):
    models, export, _, tmp_path = setup
    (export / "transformer-ttt.safetensors").rename(export / "transformer-ttt-63s-partial.safetensors")
    before = {p: p.read_bytes() for p in models.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="transformer-ttt.safetensors"):
        ship_mod.main(["--export", str(export), "--logs", str(tmp_path / "logs"), "--note", "x", "--local-note", "y",
                       "--models", str(models)])
    assert {p: p.read_bytes() for p in models.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "logs").exists()


def test_shipping_other_weights_than_the_export_is_caught(ship_mod, setup, monkeypatch):
    """What happened by hand in session 9: the embedded default built from an older folder than the export."""
    models, export, _, tmp_path = setup
    maker = ship_mod._maker()
    real_write = maker.write
    stale = models / "embedded-default" / "transformer"  # the old weights, still in place

    def write_from_a_stale_folder(out, *, transformer, **kw):
        old = tmp_path / "stale"
        shutil.copytree(stale, old)
        return real_write(out, transformer=old, **kw)

    monkeypatch.setattr(maker, "write", write_from_a_stale_folder)
    monkeypatch.setattr(ship_mod, "_maker", lambda: maker)
    before = {p: p.read_bytes() for p in models.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="tensors differ"):
        ship_mod.main(["--export", str(export), "--logs", str(tmp_path / "logs"), "--note", "x", "--local-note", "y",
                       "--models", str(models)])
    assert not (tmp_path / "logs").exists()
    # nothing half-shipped: both models as they were, no staging folder left behind
    assert {p: p.read_bytes() for p in models.rglob("*") if p.is_file()} == before
