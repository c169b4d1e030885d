"""PPD: personalised preference fine-tuning of Stable Cascade Stage C (library and trainer; never imports ComfyUI)."""

__version__ = "0.1.0"
