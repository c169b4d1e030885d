"""PPD for ComfyUI: the pack's entry point.

ComfyUI imports this folder as a package. Outside ComfyUI (tests, the trainer, a plain ``import``) importing it must
not fail, so the nodes register only when ComfyUI's own modules are importable.
"""

import importlib.util

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"  # the Preference Picker's browser side (plain JavaScript, no build step)

if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811
    from .nodes.folders import register as _register_folders
    from .nodes.picker_routes import register as _register_routes

    _register_folders()
    _register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
