"""ComfyUI nodes of the TTT one-minute video pack: thin adapters over ``ttt_core``.

    Storyboard Loader -> TTT-DiT Model Loader -> One-Minute Sampler -> Segment Decoder -> mp4

Custom types passed between them: TTT_STORYBOARD (ttt_core.storyboard.Storyboard), TTT_MODEL
(ttt_core.pipeline.ModelBundle), TTT_LATENTS (dict with the latents [1, F_lat, C, h, w]). ComfyUI modules
(folder_paths, comfy.*) are imported only when a node runs, so the pack imports without ComfyUI.
"""

from .decoder import TTTSegmentDecoder
from .model_loader import TTTModelLoader
from .sampler import TTTOneMinuteSampler
from .storyboard_loader import TTTStoryboardLoader

NODE_CLASS_MAPPINGS = {
    "TTTStoryboardLoader": TTTStoryboardLoader,
    "TTTModelLoader": TTTModelLoader,
    "TTTOneMinuteSampler": TTTOneMinuteSampler,
    "TTTSegmentDecoder": TTTSegmentDecoder,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TTTStoryboardLoader": "Storyboard Loader (TTT Video)",
    "TTTModelLoader": "TTT-DiT Model Loader",
    "TTTOneMinuteSampler": "One-Minute Sampler (TTT Video)",
    "TTTSegmentDecoder": "Segment Decoder (TTT Video)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
