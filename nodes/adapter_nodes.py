"""PPD Adapter Loader, Apply PPD Adapter (MODEL -> MODEL, Stage C or SDXL) and the PPD Stage C Sampler.

The patching itself lives in ``stage_c_patch.py`` and ``sdxl_patch.py`` (imported only inside ComfyUI).
"""

from __future__ import annotations

from pathlib import Path

from ..ppd_train.adapter import load_adapter
from ..ppd_train.errors import IncompatibleError
from . import folders
from .checks import check_strength, strength_problem
from .sockets import ADAPTER, CATEGORY, EMBEDDING, NamedAdapter, tip


def load_named_adapter(path: Path, name: str) -> NamedAdapter:
    return NamedAdapter(name, load_adapter(path))


def _strength_inputs() -> dict:
    return {
        "weight": ("FLOAT", tip("How strongly the user's taste steers the model. 0 = the model exactly.",
                                default=1.0, min=0.0, max=3.0, step=0.05)),
        "start_percent": ("FLOAT", tip("Sampling progress where the user starts to count (0 = first step).",
                                       default=0.0, min=0.0, max=1.0, step=0.01)),
        "end_percent": ("FLOAT", tip("Sampling progress where the user stops counting (1 = last step).",
                                     default=1.0, min=0.0, max=1.0, step=0.01)),
    }


def _user_inputs() -> dict:
    return {
        "ppd_adapter": (ADAPTER, tip("From PPD Adapter Loader; it must match the model (Stage C lite/full or SDXL) "
                                     "and the embedder that made the user embedding.")),
        "user_embedding": (EMBEDDING, tip("From VLM User Embedder, Load User Embedding or Embedding Interpolate.")),
    }


def apply_to_model(model, adapter: NamedAdapter, embedding, weight: float, start_percent: float, end_percent: float):
    """Apply PPD Adapter on whichever base the MODEL is: Stage C through object patches, SDXL through ComfyUI's attn2
    patches; the adapter's own base is checked against it there."""
    from comfy.ldm.cascade.stage_c import StageC

    from . import sdxl_patch, stage_c_patch

    if sdxl_patch.is_sdxl(model):
        binding = sdxl_patch
    elif isinstance(model.get_model_object("diffusion_model"), StageC):
        binding = stage_c_patch
    else:
        raise IncompatibleError(
            f"Apply PPD Adapter needs a Stable Cascade Stage C or an SDXL model, got {type(model.model).__name__}. "
            "Connect the MODEL of the Stage C checkpoint (stable_cascade_stage_c / lite) or of an SDXL checkpoint, "
            "not Stage B or another model.")
    return binding.apply_adapter(model, adapter, embedding, weight, start_percent, end_percent)


class PPDAdapterLoader:
    DESCRIPTION = "Loads a PPD adapter (.safetensors written by ppd-train) from models/ppd_adapters."
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("ppd_adapter",)
    OUTPUT_TOOLTIPS = ("The adapter, for Apply PPD Adapter or the PPD Stage C Sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "adapter_name": (folder_paths.get_filename_list(folders.ADAPTERS),
                             tip("An adapter file in models/ppd_adapters (or a 'ppd_adapters' folder from "
                                 "extra_model_paths.yaml). Press Refresh after adding one.")),
        }}

    def load(self, adapter_name):
        return (load_named_adapter(folders.find(folders.ADAPTERS, adapter_name, "PPD adapter"), adapter_name),)


class PPDApplyAdapter:
    DESCRIPTION = ("Adds a user's taste to a Stable Cascade Stage C or SDXL MODEL, for the stock KSampler or any "
                   "other sampler. The negative/unconditional pass gets no user. Chain it twice for two users; on "
                   "SDXL, put IP-Adapter / InstantID nodes before it (PPD keeps their attention patches, they do not "
                   "keep PPD's).")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the user's attention added (the input model is left unchanged).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", tip("The Stage C MODEL (stable_cascade_stage_c or lite) or an SDXL "
                                                    "MODEL (Load Checkpoint); the adapter must be made for it."))}
                | _user_inputs() | _strength_inputs()}

    @classmethod
    def VALIDATE_INPUTS(cls, weight=None, start_percent=None, end_percent=None):
        # ComfyUI skips its own min/max check for inputs named here, so this checks those too; linked values arrive
        # as None here and are checked when the node runs
        return strength_problem(_strength_inputs(), weight, start_percent, end_percent) or True

    def apply(self, model, ppd_adapter, user_embedding, weight, start_percent, end_percent):
        check_strength(_strength_inputs(), weight, start_percent, end_percent)
        return (apply_to_model(model, ppd_adapter, user_embedding, weight, start_percent, end_percent),)


class PPDStageCSampler:
    DESCRIPTION = ("Samples Stable Cascade Stage C for one user: a KSampler with the PPD adapter built in. Its "
                   "LATENT goes to StableCascade_StageB_Conditioning.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_c",)
    OUTPUT_TOOLTIPS = ("The Stage C latent, for StableCascade_StageB_Conditioning.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {"required": {
            "model": ("MODEL", tip("The Stage C MODEL (stable_cascade_stage_c or lite).")),
            **_user_inputs(),
            "positive": ("CONDITIONING", tip("The prompt.")),
            "negative": ("CONDITIONING", tip("The negative prompt (sampled without the user).")),
            "latent_image": ("LATENT", tip("From StableCascade_EmptyLatentImage (its 'stage_c' output).")),
            "seed": ("INT", tip("Noise seed.", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True)),
            "steps": ("INT", tip("Stage C steps (Stable Cascade default 20).", default=20, min=1, max=10000)),
            "cfg": ("FLOAT", tip("Classifier-free guidance (Stable Cascade default 4).", default=4.0, min=0.0,
                                 max=100.0, step=0.1, round=0.01)),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, tip("Sampler.", default="euler_ancestral")),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, tip("Scheduler.", default="simple")),
            "denoise": ("FLOAT", tip("1 = from pure noise.", default=1.0, min=0.0, max=1.0, step=0.01)),
            **_strength_inputs(),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, weight=None, start_percent=None, end_percent=None):
        # ComfyUI skips its own min/max check for inputs named here, so this checks those too; linked values arrive
        # as None here and are checked when the node runs
        return strength_problem(_strength_inputs(), weight, start_percent, end_percent) or True

    def sample(self, model, ppd_adapter, user_embedding, positive, negative, latent_image, seed, steps, cfg,
               sampler_name, scheduler, denoise, weight, start_percent, end_percent):
        check_strength(_strength_inputs(), weight, start_percent, end_percent)
        from nodes import common_ksampler  # ComfyUI's own KSampler path (top-level 'nodes' is ComfyUI's module)

        from .sdxl_patch import is_sdxl
        from .stage_c_patch import apply_adapter

        if is_sdxl(model):
            raise IncompatibleError("The PPD Stage C Sampler samples Stable Cascade Stage C, and this MODEL is SDXL. "
                                    "For SDXL use Apply PPD Adapter and the stock KSampler.")

        patched = apply_adapter(model, ppd_adapter, user_embedding, weight, start_percent, end_percent)
        return common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=denoise)
