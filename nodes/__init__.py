"""ComfyUI node classes (thin adapters over ttt_core). Filled in by the pipeline work."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
