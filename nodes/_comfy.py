"""Optional ComfyUI services (folder_paths, ProgressBar, interrupt), with stand-ins when ComfyUI is absent.

Nothing here imports ComfyUI at module load: the pack (and its tests) import without it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("ttt_video")  # ComfyUI shows INFO and above; stdout prints can sit in a buffer

PACK_ROOT = Path(__file__).resolve().parents[1]
MODELS_SUBFOLDER = "ttt_video"  # ComfyUI/models/ttt_video: CogVideoX folders, TTT weights
MODEL_EXTENSIONS = (".safetensors",)


def folder_paths():
    """ComfyUI's folder_paths module, or None outside ComfyUI."""
    try:
        import folder_paths as fp  # type: ignore[import-not-found]
    except ImportError:
        return None
    return fp


def register_model_folder() -> None:
    """Make ComfyUI/models/ttt_video a model folder of ours (idempotent; no-op without ComfyUI)."""
    fp = folder_paths()
    if fp is None:
        return
    if MODELS_SUBFOLDER not in fp.folder_names_and_paths:
        fp.folder_names_and_paths[MODELS_SUBFOLDER] = ([os.path.join(fp.models_dir, MODELS_SUBFOLDER)], set(MODEL_EXTENSIONS))


def input_directory() -> Path:
    fp = folder_paths()
    if fp is not None:
        return Path(fp.get_input_directory())
    return Path(os.environ.get("TTT_VIDEO_INPUT_DIR", Path.cwd() / "input"))


def output_directory() -> Path:
    fp = folder_paths()
    if fp is not None:
        return Path(fp.get_output_directory())
    return Path(os.environ.get("TTT_VIDEO_OUTPUT_DIR", Path.cwd() / "output"))


def temp_directory() -> Path:
    fp = folder_paths()
    if fp is not None:
        return Path(fp.get_temp_directory())
    return Path(os.environ.get("TTT_VIDEO_TEMP_DIR", Path.cwd() / "temp"))


def search_folders(kind: str) -> list[Path]:
    """Folders searched for ``kind``: "models" (ours + diffusion_models + diffusers), "text_encoders", "vae".
    Outside ComfyUI: $TTT_VIDEO_MODELS_DIR if set."""
    fp = folder_paths()
    out: list[Path] = []
    if fp is not None:
        register_model_folder()
        names = {"models": [MODELS_SUBFOLDER, "diffusion_models", "diffusers"],
                 "text_encoders": [MODELS_SUBFOLDER, "text_encoders"],
                 "vae": [MODELS_SUBFOLDER, "vae"]}[kind]
        for name in names:
            try:
                out.extend(Path(p) for p in fp.get_folder_paths(name))
            except KeyError:
                continue
    elif os.environ.get("TTT_VIDEO_MODELS_DIR"):
        out.append(Path(os.environ["TTT_VIDEO_MODELS_DIR"]))
    seen, unique = set(), []
    for p in out:
        if p not in seen and p.is_dir():
            seen.add(p)
            unique.append(p)
    return unique


def progress_bar(total: int):
    """comfy.utils.ProgressBar or None."""
    try:
        import comfy.utils  # type: ignore[import-not-found]
    except ImportError:
        return None
    return comfy.utils.ProgressBar(total)


def torch_device() -> str | None:
    """ComfyUI's compute device (respects --cpu etc.), or None outside ComfyUI."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return str(mm.get_torch_device())
    except Exception:
        return None


def interrupt_check():
    """A callable that raises ComfyUI's InterruptProcessingException when the user pressed cancel, or None."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return mm.throw_exception_if_processing_interrupted


def preview_image(rgb_uint8):
    """ComfyUI's preview tuple ("JPEG", PIL image, max size) from an [H, W, 3] uint8 array, or None."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return ("JPEG", Image.fromarray(rgb_uint8), 512)
