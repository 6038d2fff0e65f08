"""TTT one-minute video: ComfyUI node pack and standalone library.

Inside ComfyUI this file is the pack's entry point (NODE_CLASS_MAPPINGS etc.). Standalone it is the
``ttt_video`` package; the library lives in ``ttt_video.ttt_core`` and never needs ComfyUI.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
