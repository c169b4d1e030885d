"""ComfyUI nodes of the PPD pack. Imported only inside ComfyUI; always import within the pack relatively, because
ComfyUI has its own top-level module called ``nodes``."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
