"""Project skeleton: segment geometry, presets, and how the pack installs and imports."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ttt_video.ttt_core.config import TTTDiTConfig, preset
from ttt_video.ttt_core.geometry import (
    VideoGeometry,
    latent_frames_for_segments,
    pixel_frames_for_latent_frames,
    segments_for_latent_frames,
)

ROOT = Path(__file__).resolve().parents[1]


def test_one_minute_geometry_matches_the_paper():
    g = preset("cogvideox-5b").geometry(21)
    assert g.latent_frames == 253
    assert g.pixel_frames == 1009
    assert g.tokens_per_latent_frame == 1350
    assert g.video_tokens == 341_550
    assert (g.pixel_width, g.pixel_height) == (720, 480)
    # paper Table 2: the 3-s context of 18,048 tokens = 17,550 video tokens + 498 text tokens
    assert preset("cogvideox-5b").geometry(1).video_tokens == 17_550


@pytest.mark.parametrize("segments", [1, 2, 3, 7, 21])
def test_windows_overlap_by_one_frame_and_owned_frames_partition(segments):
    g = VideoGeometry(segments, 8, 12, 2, 16)
    owned = [g.owned_frames(i) for i in range(segments)]
    assert owned[0][0] == 0 and owned[-1][1] == g.latent_frames
    for (a0, a1), (b0, b1) in zip(owned, owned[1:]):
        assert a1 == b0
    for i in range(segments):
        w0, w1 = g.window(i)
        assert w1 - w0 == 13 and w1 <= g.latent_frames
        if i:
            assert g.window(i - 1)[1] - w0 == 1  # neighbours share exactly one latent frame
    pix = [g.owned_pixel_frames(i) for i in range(segments)]
    assert pix[0][0] == 0 and pix[-1][1] == g.pixel_frames
    assert all(a[1] == b[0] for a, b in zip(pix, pix[1:]))


def test_geometry_round_trips_and_rejects_bad_counts():
    for s in range(1, 30):
        assert segments_for_latent_frames(latent_frames_for_segments(s)) == s
    assert pixel_frames_for_latent_frames(13) == 49
    with pytest.raises(ValueError, match="13 \\+ 12"):
        segments_for_latent_frames(14)
    with pytest.raises(ValueError):
        latent_frames_for_segments(0)
    with pytest.raises(IndexError):
        VideoGeometry(2, 8, 12, 2, 16).window(2)
    with pytest.raises(ValueError, match="patch"):
        VideoGeometry(1, 9, 12, 2, 16)


def test_presets_and_config_round_trip():
    cfg = preset("tiny", global_layer="ttt_linear")
    assert cfg.ttt_base_lr == 1.0 and cfg.width == 32
    assert TTTDiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="global_layer"):
        preset("tiny", global_layer="mamba")
    with pytest.raises(KeyError, match="unknown preset"):
        preset("cogvideox-2b")
    # a diffusers transformer config.json is accepted (private keys ignored)
    d = {"_class_name": "CogVideoXTransformer3DModel", "num_layers": 3, "out_channels": None, "in_channels": 8}
    c = TTTDiTConfig.from_dict(d)
    assert c.num_layers == 3 and c.out_channels == 8


def test_diffusers_kwargs_build_a_cogvideox_transformer():
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**preset("tiny").diffusers_kwargs())
    assert len(model.transformer_blocks) == 2


def test_only_ttt_video_is_installed_at_top_level():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    assert packages and all(p == "ttt_video" or p.startswith("ttt_video.") for p in packages)
    # every package directory on disk is listed (a forgotten one would be missing from wheels)
    for init in ROOT.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in {"tests", ".venv", "build", "benchmarks", "scripts"} or rel.parts[0].startswith("."):
            continue
        assert "ttt_video." + ".".join(rel.parts) in packages, f"{rel} is not in pyproject packages"


def test_no_absolute_imports_of_colliding_names():
    pattern = re.compile(r"^\s*(from|import)\s+(nodes|kernels|ttt_core|comfy|folder_paths|server|utils)\b", re.M)
    offenders = []
    for path in list(ROOT.glob("ttt_core/**/*.py")) + list(ROOT.glob("nodes/**/*.py")) + list(ROOT.glob("kernels/**/*.py")):
        for m in pattern.finditer(path.read_text()):
            line = path.read_text()[: m.start()].count("\n") + 1
            # ComfyUI modules may be imported lazily inside functions (indented, guarded)
            if m.group(2) in {"comfy", "folder_paths", "server"} and m.group(0).startswith((" ", "\t")):
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0).strip()}")
    assert not offenders, offenders


def test_pack_imports_without_comfyui_and_loads_like_comfyui_does(tmp_path):
    code = (
        "import sys, importlib.util\n"
        "import ttt_video\n"
        "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules\n"
        f"spec = importlib.util.spec_from_file_location('ComfyUI-TTT-Video', r'{ROOT / '__init__.py'}',"
        f" submodule_search_locations=[r'{ROOT}'])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)\n"
        "assert isinstance(mod.NODE_CLASS_MAPPINGS, dict)\n"
        "assert set(mod.NODE_CLASS_MAPPINGS) == set(ttt_video.NODE_CLASS_MAPPINGS)\n"
        "assert 'nodes' not in sys.modules and 'kernels' not in sys.modules\n"
        "print('ok', len(mod.NODE_CLASS_MAPPINGS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_comfyui_requirements_match_pyproject_dependencies():
    """requirements.txt (what ComfyUI users install) lists every runtime dependency except torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda spec: re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower()
    wanted = {name(d) for d in project["dependencies"]} - {"torch"}
    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {name(l) for l in lines if l}
    assert wanted == listed, (wanted - listed, listed - wanted)
