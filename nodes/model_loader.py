"""TTT-DiT Model Loader node -> TTT_MODEL (transformer + where its text encoder, VAE, scheduler live)."""

from __future__ import annotations

from pathlib import Path

from . import _comfy

log = _comfy.log

EMBEDDED = "embedded default"
NONE = "none"
FROM_MODEL = "from model"


def _is_model_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "transformer").is_dir()
                           or ((p / "config.json").is_file() and any(p.glob("*.safetensors"))))


def _scan(kind: str, want_dirs, want_files) -> dict[str, Path]:
    """{display name: path} for entries (two levels deep) of the searched folders."""
    found: dict[str, Path] = {}
    for base in _comfy.search_folders(kind):
        candidates = [c for c in sorted(base.iterdir())]
        candidates += [g for c in candidates if c.is_dir() and not want_dirs(c) for g in sorted(c.iterdir())]
        for c in candidates:
            if (c.is_dir() and want_dirs(c)) or (c.is_file() and want_files(c)):
                found.setdefault(f"{base.name}/{c.relative_to(base).as_posix()}", c)
    return found


def model_choices() -> dict[str, Path]:
    return _scan("models", _is_model_folder, lambda f: f.suffix == ".safetensors")


def ttt_weight_choices() -> dict[str, Path]:
    return _scan("models", lambda d: False, lambda f: f.suffix == ".safetensors")


def text_encoder_choices() -> dict[str, Path]:
    return _scan("text_encoders", lambda d: (d / "text_encoder").is_dir() or (d / "tokenizer").is_dir(), lambda f: False)


def vae_choices() -> dict[str, Path]:
    return _scan("vae", lambda d: (d / "vae" / "config.json").is_file() or (d / "config.json").is_file(), lambda f: False)


def _lookup(table: dict[str, Path], name: str, what: str) -> str:
    if name not in table:
        raise FileNotFoundError(f"TTT-DiT Model Loader: {what} {name!r} not found (searched "
                                f"{', '.join(str(p) for p in _comfy.search_folders('models')) or 'no model folders'})")
    return str(table[name])


class TTTModelLoader:
    """Loads a TTT-DiT (CogVideoX transformer + TTT layers); the text encoder and VAE load when needed."""

    CATEGORY = "TTT Video"
    FUNCTION = "load"
    RETURN_TYPES = ("TTT_MODEL", "STRING")
    RETURN_NAMES = ("model", "description")
    OUTPUT_TOOLTIPS = ("the model bundle for the One-Minute Sampler and the Segment Decoder", "what was loaded")
    DESCRIPTION = ("Load a TTT-DiT. 'embedded default' is a bundled small model trained on the toy cat-and-mouse world "
                   "(runs on a CPU; draws only that world). Put CogVideoX folders and TTT weights in "
                   "ComfyUI/models/ttt_video/.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ([EMBEDDED, *model_choices()], {
                    "default": EMBEDDED,
                    "tooltip": "a CogVideoX-style folder (transformer/, text_encoder/, tokenizer/, vae/, scheduler/) or a "
                               "transformer .safetensors from models/ttt_video, diffusion_models or diffusers. "
                               "'embedded default' = bundled small toy-world model.",
                }),
                "ttt_weights": ([NONE, *ttt_weight_choices()], {
                    "default": NONE,
                    "tooltip": "TTT layer weights (.safetensors) loaded on top of the model (e.g. your fine-tune)",
                }),
                "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip": "auto: the GPU if there is one"}),
                "dtype": (["auto", "float32", "bfloat16", "float16"], {
                    "default": "auto", "tooltip": "auto: bfloat16 on GPU, float32 on CPU"}),
                "offload": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "keep the models in CPU memory and move each to the GPU only while it runs",
                }),
            },
            "optional": {
                "text_encoder": ([FROM_MODEL, *text_encoder_choices()], {
                    "default": FROM_MODEL, "tooltip": "T5 folder (tokenizer/ + text_encoder/); default: the model's"}),
                "vae": ([FROM_MODEL, *vae_choices()], {
                    "default": FROM_MODEL, "tooltip": "CogVideoX VAE folder; default: the model's vae/"}),
            },
        }

    def load(self, model, ttt_weights, device, dtype, offload, text_encoder=FROM_MODEL, vae=FROM_MODEL):
        from ..ttt_core import pipeline

        model_path = None if model == EMBEDDED else _lookup(model_choices(), model, "model")
        weights = None if ttt_weights == NONE else _lookup(ttt_weight_choices(), ttt_weights, "TTT weights")
        te = None if text_encoder in (FROM_MODEL, None) else _lookup(text_encoder_choices(), text_encoder, "text encoder")
        vae_path = None if vae in (FROM_MODEL, None) else _lookup(vae_choices(), vae, "VAE")
        if device == "auto":
            device = _comfy.torch_device() or "auto"  # follow ComfyUI's choice (e.g. --cpu)
        bundle = pipeline.load_model_bundle(model_path, weights, text_encoder=te, vae=vae_path, device=device,
                                            dtype=dtype, offload=offload)
        if bundle.is_embedded_default:
            log.warning("%s", pipeline.EMBEDDED_DEFAULT_NOTE)
        return (bundle, bundle.describe())
