"""The four ComfyUI nodes, called the way ComfyUI calls them: storyboard file -> loader -> model loader ->
sampler -> decoder -> mp4 (read back with PyAV) for 1 and 3 segments; progress / preview / cancel + resume
through stand-ins for ComfyUI's modules; folder_paths model discovery; imports without ComfyUI."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import ttt_video
from ttt_video.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from ttt_video.nodes import storyboard_loader as sbl

av = pytest.importorskip("av")

ONE = "A paper boat floats down a rainy street gutter. The camera follows it at ground level.\n"
THREE = """Negative prompt: blurry

<scene start>
A paper boat floats down a rainy street gutter.

The boat spins in a small whirlpool near a drain.
<scene end>

<scene start>
A child in a yellow raincoat picks the boat up.
Negative: night
<scene end>
"""


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    for name in ("input", "output", "cache"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("TTT_VIDEO_INPUT_DIR", str(tmp_path / "input"))
    monkeypatch.setenv("TTT_VIDEO_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("TTT_VIDEO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def call(node_type, **kwargs):
    cls = NODE_CLASS_MAPPINGS[node_type]
    out = getattr(cls(), cls.FUNCTION)(**kwargs)
    return out["result"] if isinstance(out, dict) else out


def test_pack_imports_without_comfyui_and_registers_four_nodes():
    assert "folder_paths" not in sys.modules and "comfy" not in sys.modules
    assert ttt_video.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) and len(NODE_CLASS_MAPPINGS) == 4
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "TTT Video" and hasattr(cls, cls.FUNCTION) and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        for section in cls.INPUT_TYPES().values():
            for inp, spec in section.items():
                assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    m = NODE_CLASS_MAPPINGS["TTTModelLoader"].INPUT_TYPES()["required"]["model"]
    assert m[0][0] == "embedded default" and "cat-and-mouse" in NODE_CLASS_MAPPINGS["TTTModelLoader"].DESCRIPTION


@pytest.mark.parametrize("text,segments", [(ONE, 1), (THREE, 3)])
def test_end_to_end_through_the_nodes(dirs, text, segments):
    (dirs / "input" / "stories").mkdir()
    (dirs / "input" / "stories" / "boat.txt").write_text(text)
    choices = NODE_CLASS_MAPPINGS["TTTStoryboardLoader"].INPUT_TYPES()["required"]["storyboard_file"][0]
    assert choices[0] == sbl.TEXT_CHOICE and "stories/boat.txt" in choices and "bundled/preview_9s.txt" in choices

    sb, n_seg, duration, summary = call("TTTStoryboardLoader", storyboard_file="stories/boat.txt", storyboard_text="",
                                        video_index=1)
    frames = 1 + 4 * (13 + 12 * (segments - 1) - 1)
    assert n_seg == segments and duration == pytest.approx(frames / 16) and f"{segments} segment" in summary
    model, desc = call("TTTModelLoader", model="embedded default", ttt_weights="none", device="cpu", dtype="auto",
                       offload=False)
    assert "cat-and-mouse" in desc
    latents, info = call("TTTOneMinuteSampler", model=model, storyboard=sb, seed=4, steps=2, guidance=6.0,
                         guidance_mode="dynamic", scheduler="dpmpp_2m", use_negative=True)
    assert latents["latents"].shape == (1, 13 + 12 * (segments - 1), model.config.in_channels, 8, 12)
    path, images, count, dinfo = call("TTTSegmentDecoder", model=model, latents=latents,
                                      filename_prefix="ttt/boat", return_images=True, vae_tiling=False)
    assert count == frames and f"1 + 4 x ({13 + 12 * (segments - 1)} - 1)" in dinfo
    assert Path(path) == dirs / "output" / "ttt" / "boat_00001.mp4"
    with av.open(path) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        assert (n, s.codec_context.width, s.codec_context.height, s.average_rate) == (frames, 96, 64, 16)
    assert images.shape == (frames, 64, 96, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
    # a second run never overwrites: next counter
    path2, *_ = call("TTTSegmentDecoder", model=model, latents=latents, filename_prefix="ttt/boat",
                     return_images=False, vae_tiling=False)
    assert Path(path2).name == "boat_00002.mp4" and Path(path).exists()


def test_text_widget_and_clear_errors(dirs):
    sb, n, _, _ = call("TTTStoryboardLoader", storyboard_file=sbl.TEXT_CHOICE, storyboard_text=THREE, video_index=1)
    assert n == 3 and sb.prompts()[1].endswith("<end_scene>") and sb.prompts()[2].startswith("<start_scene>")
    with pytest.raises(ValueError, match="text box is empty"):
        call("TTTStoryboardLoader", storyboard_file=sbl.TEXT_CHOICE, storyboard_text="  ", video_index=1)
    with pytest.raises(FileNotFoundError, match="not in ComfyUI's input folder"):
        call("TTTStoryboardLoader", storyboard_file="gone.txt", storyboard_text="", video_index=1)
    with pytest.raises(FileNotFoundError, match="not found"):
        call("TTTModelLoader", model="ttt_video/nothing", ttt_weights="none", device="cpu", dtype="auto", offload=False)


# ------------------------------------------------------------------------------------------------------
# stand-ins for ComfyUI's modules: ProgressBar, interrupt, folder_paths
# ------------------------------------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


@pytest.fixture
def fake_comfy(dirs, monkeypatch):
    state = {"ticks": [], "interrupt_at": None, "checks": 0}
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["ticks"].append((value, total, preview))

    def throw_exception_if_processing_interrupted():
        state["checks"] += 1
        if state["interrupt_at"] is not None and state["checks"] == state["interrupt_at"]:
            raise _Interrupt("cancelled in the UI")

    utils.ProgressBar = ProgressBar
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    comfy.utils, comfy.model_management = utils, mm
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(dirs / "models")
    fp.folder_names_and_paths = {"diffusion_models": ([str(dirs / "models" / "diffusion_models")], {".safetensors"}),
                                 "text_encoders": ([str(dirs / "models" / "text_encoders")], {".safetensors"}),
                                 "vae": ([str(dirs / "models" / "vae")], {".safetensors"})}
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_input_directory = lambda: str(dirs / "input")
    fp.get_output_directory = lambda: str(dirs / "output")
    fp.get_temp_directory = lambda: str(dirs / "temp")
    for name, mod in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm), ("folder_paths", fp)):
        monkeypatch.setitem(sys.modules, name, mod)
    return state


def test_model_discovery_through_folder_paths(dirs, fake_comfy):
    from ttt_video.ttt_core.pipeline import EMBEDDED_DEFAULT_DIR

    ours = dirs / "models" / "ttt_video"
    ours.mkdir(parents=True)
    shutil.copytree(EMBEDDED_DEFAULT_DIR, ours / "TinyCog")
    (ours / "my_ttt.safetensors").write_bytes(b"")  # listed only; not loaded here
    req = NODE_CLASS_MAPPINGS["TTTModelLoader"].INPUT_TYPES()
    models = req["required"]["model"][0]
    assert models[0] == "embedded default" and "ttt_video/TinyCog" in models and "ttt_video/my_ttt.safetensors" in models
    assert "ttt_video/my_ttt.safetensors" in req["required"]["ttt_weights"][0]
    assert "ttt_video/TinyCog" in req["optional"]["vae"][0] and "ttt_video/TinyCog" in req["optional"]["text_encoder"][0]
    bundle, desc = call("TTTModelLoader", model="ttt_video/TinyCog", ttt_weights="none", device="cpu", dtype="float32",
                        offload=False)
    assert bundle.name == "TinyCog" and not bundle.is_embedded_default and "cat-and-mouse" not in desc


def test_progress_preview_cancel_and_requeue_resume(dirs, fake_comfy):
    sb, *_ = call("TTTStoryboardLoader", storyboard_file=sbl.TEXT_CHOICE, storyboard_text=THREE, video_index=1)
    model, _ = call("TTTModelLoader", model="embedded default", ttt_weights="none", device="cpu", dtype="auto",
                    offload=False)
    kw = dict(model=model, storyboard=sb, seed=2, steps=4, guidance=6.0, guidance_mode="dynamic", scheduler="dpmpp_2m",
              use_negative=True)
    ref, _ = call("TTTOneMinuteSampler", **kw)
    ticks = fake_comfy["ticks"]
    assert [t[0] for t in ticks] == [1, 2, 3, 4] and all(t[1] == 4 for t in ticks)
    previews = [t[2] for t in ticks if t[2] is not None]
    assert previews and previews[0][0] == "JPEG" and previews[0][1].size == (96, 64)

    ticks.clear()
    fake_comfy["checks"], fake_comfy["interrupt_at"] = 0, 3  # cancel before step 3
    with pytest.raises(_Interrupt):
        call("TTTOneMinuteSampler", **kw)
    saved = list((dirs / "output" / "ttt_video_resume").glob("*.safetensors"))
    assert len(saved) == 1 and [t[0] for t in ticks] == [1, 2]
    ticks.clear()
    fake_comfy["interrupt_at"] = None
    again, _ = call("TTTOneMinuteSampler", **kw)  # re-queue: continues from step 3
    assert [t[0] for t in ticks] == [3, 4]
    assert torch.equal(again["latents"], ref["latents"])
    assert not list((dirs / "output" / "ttt_video_resume").glob("*.safetensors"))
