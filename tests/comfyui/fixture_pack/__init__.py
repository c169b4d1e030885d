"""Test-only ComfyUI pack: tiny Stable Cascade Stage C / B / A and a tiny SDXL UNet built with ComfyUI's own classes,
and a text-free conditioning node. Loaded next to the PPD pack by the real-ComfyUI integration tests; never shipped.

ComfyUI detects Stage C lite/full by width, so tiny checkpoints cannot go through CheckpointLoaderSimple; this pack
loads them the way ``comfy.sd.load_diffusion_model_state_dict`` does, with a tiny config.
"""

import hashlib

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
import torch
from comfy.ldm.cascade.stage_a import StageA

TEXT_WIDTH = 32
# Stage C's structure (two levels, each layer ResBlock, TimestepBlock, AttnBlock), 4 attention blocks of width 32.
TINY_C = dict(stable_cascade_stage="c", c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=32, c_hidden=[32, 32],
              nhead=[2, 2], blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
              c_clip_text=TEXT_WIDTH, c_clip_text_pooled=TEXT_WIDTH, c_clip_img=768, c_clip_seq=4, kernel_size=3,
              dropout=[0.0, 0.0], self_attn=True, t_conds=["sca", "crp"], switch_level=[False])
TINY_B = dict(stable_cascade_stage="b", c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[16, 32],
              nhead=[-1, 2], blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CT", "CTA"],
              c_clip=TEXT_WIDTH, c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=[0.0, 0.0],
              self_attn=True, t_conds=["sca"])
# SDXL's structure (ComfyUI's UNetModel as comfy.model_detection describes SDXL: linear transformers, "sequential"
# ADM of pooled text + 6 size embeddings of 256, the middle as deep as the last level, so diffusers' UNet can hold it
# too) at 2 levels of width 32/64: 11 cross-attention layers (input 1 + 2, middle 2, output 2 + 2 + 1 + 1), 2 and 4
# heads. Text as from two text encoders of width 16 (concatenated: TEXT_WIDTH), pooled from the second.
SDXL_POOLED_WIDTH = 16
TINY_SDXL = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
                 num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 2], transformer_depth_middle=2,
                 transformer_depth_output=[1, 1, 2, 2], context_dim=TEXT_WIDTH,
                 adm_in_channels=SDXL_POOLED_WIDTH + 6 * 256, num_classes="sequential", use_spatial_transformer=True,
                 legacy=False, use_linear_in_transformer=True, use_temporal_attention=False,
                 use_temporal_resblock=False)
SDXL_HEAD_CHANNELS = 16
SDXL_FILE = "tiny_sdxl_unet.safetensors"
FILES = {"c": "tiny_stage_c.safetensors", "b": "tiny_stage_b.safetensors", "a": "tiny_stage_a.safetensors"}


def _seeded_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in ** 0.5 if p.dim() > 1 else 0.02))


def _model_config(stage: str, dtype: torch.dtype = torch.float32):
    cls = comfy.supported_models.Stable_Cascade_C if stage == "c" else comfy.supported_models.Stable_Cascade_B
    cfg = cls(TINY_C if stage == "c" else TINY_B)
    cfg.set_inference_dtype(dtype, None)
    return cfg


def to_stability_format(sd: dict) -> dict:
    """ComfyUI's Stage C keys -> Stability's released layout (q/k/v merged into ``in_proj``), as the files ship."""
    out = {}
    for k, v in sd.items():
        if ".attn.to_q." in k:
            stem, kind = k.split(".attn.to_q.")
            parts = [sd[f"{stem}.attn.to_{x}.{kind}"] for x in "qkv"]
            out[f"{stem}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif ".attn.to_k." not in k and ".attn.to_v." not in k:
            out[k] = v
    return out


def write_tiny_cascade(folder: str, seed: int = 0) -> None:
    """Write tiny Stage C (Stability layout), Stage B and Stage A files with seeded random weights."""
    for i, stage in enumerate("cb"):
        model = _model_config(stage).get_model({})
        _seeded_(model.diffusion_model, seed + i)
        sd = {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
        comfy.utils.save_torch_file(to_stability_format(sd) if stage == "c" else sd, f"{folder}/{FILES[stage]}")
    stage_a = StageA()
    _seeded_(stage_a, seed + 2)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in stage_a.state_dict().items()}, f"{folder}/{FILES['a']}")


def load_stage(path: str, stage: str, dtype: torch.dtype = torch.float32):
    """A MODEL (ModelPatcher) from a tiny Stage C/B file, loaded like comfy.sd.load_diffusion_model_state_dict."""
    sd = comfy.utils.load_torch_file(path)
    cfg = _model_config(stage, dtype)
    model = cfg.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def sdxl_config(dtype: torch.dtype = torch.float32, unet_config: dict | None = None):
    """ComfyUI's own SDXL model config (``comfy.supported_models.SDXL``) with the tiny UNet (or ``unet_config``)."""
    cfg = comfy.supported_models.SDXL(TINY_SDXL if unet_config is None else unet_config)
    cfg.unet_config["num_head_channels"] = SDXL_HEAD_CHANNELS  # SDXL's 64 would leave the tiny widths no heads
    cfg.set_inference_dtype(dtype, None)
    return cfg


def tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32, state_dict: dict | None = None,
              unet_config: dict | None = None):
    """A tiny SDXL MODEL (``comfy.model_base.SDXL`` in a ModelPatcher): seeded weights, or ``state_dict`` (ComfyUI's
    UNet keys, without the ``model.diffusion_model.`` prefix)."""
    cfg = sdxl_config(dtype, unet_config)
    model = cfg.get_model({})
    if state_dict is None:
        _seeded_(model.diffusion_model, seed)
    else:
        model.diffusion_model.load_state_dict(state_dict)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_clip(seed: int = 0):
    """A CLIP with Stable Cascade's CLIP-G settings (last hidden state, no final LayerNorm, projected pooled output,
    attention masks) but 2 layers of width ``TEXT_WIDTH``, built with ComfyUI's own classes and ComfyUI's bundled
    CLIP tokenizer."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    config = {"hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH, "num_attention_heads": 2,
              "num_hidden_layers": 2, "projection_dim": TEXT_WIDTH, "vocab_size": 49408, "max_position_embeddings": 77,
              "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407,
              "pad_token_id": 1}

    class TinyClipG(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - ComfyUI's signature
            super().__init__(device=device, layer="hidden", layer_idx=-1, textmodel_json_config=dict(config),
                             dtype=dtype, special_tokens={"start": 49406, "end": 49407, "pad": 49407},
                             layer_norm_hidden_state=False, enable_attention_masks=True, return_projected_pooled=True,
                             model_options={**model_options, "model_name": "clip_g"})

    class TinyClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, dtype=dtype, clip_name="g", clip_model=TinyClipG,
                             model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.StableCascadeTokenizer, TinyClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    _seeded_(clip.cond_stage_model, seed)
    return clip


def tiny_sdxl_clip(seed: int = 0):
    """A CLIP with SDXL's two text encoders' settings (ComfyUI's ``SDXLClipModel``: CLIP-L and bigG, penultimate
    layer, no final LayerNorm, bigG's projected pooled output, ComfyUI's own SDXL tokenizer) but 3 layers of width
    ``TEXT_WIDTH / 2`` each: conditioning ``[1, 77, TEXT_WIDTH]``, pooled ``[1, SDXL_POOLED_WIDTH]``."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    width = TEXT_WIDTH // 2
    config = {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2, "num_hidden_layers": 3,
              "projection_dim": width, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu",
              "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1}

    class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - ComfyUI's signature
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=dict(config), model_options=model_options)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, textmodel_json_config=dict(config),
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClip)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    _seeded_(clip.cond_stage_model, seed)
    return clip


def stage_c_vae(seed: int = 0, calibrate: bool = True):
    """ComfyUI's Stage C VAE (``StageC_coder``: EfficientNet encoder + previewer), as Load VAE builds it from the
    effnet and previewer files, with seeded weights. ``calibrate`` sets the BatchNorm statistics from a few random
    images (so latents have a sane scale); without it the encoder looks like the previewer-only VAE."""
    from comfy.ldm.cascade.stage_c_coder import StageC_coder

    torch.manual_seed(seed)
    coder = StageC_coder()
    _seeded_(coder.previewer, seed + 1)
    with torch.no_grad():
        coder.encoder.mapper[0].weight.copy_(torch.randn(coder.encoder.mapper[0].weight.shape) * 0.03)
        if calibrate:
            for m in coder.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None  # cumulative average over the calibration batches
            # images as the encoder sees them: [0, 1] pixels, ImageNet-normalised; one batch, so eval mode on it
            # reproduces train mode layer by layer (a random deep network is chaotic otherwise)
            mean, std = coder.encoder.mean.view(3, 1, 1), coder.encoder.std.view(3, 1, 1)
            g = torch.Generator().manual_seed(seed + 10)
            pixels = (0.7 * torch.rand(32, 3, 1, 1, generator=g) + 0.3 * torch.rand(32, 3, 64, 64, generator=g))
            x = (pixels - mean) / std  # flat colours plus noise, like the tests' images
            coder.encoder.train()
            coder.encoder.mapper(coder.encoder.backbone(x))
            coder.encoder.eval()
    sd = {k: v.detach().clone() for k, v in coder.state_dict().items()}
    return comfy.sd.VAE(sd=sd)


class PPDTestTinyCascade:
    CATEGORY = "PPD test fixtures"
    RETURN_TYPES = ("MODEL", "MODEL", "VAE")
    RETURN_NAMES = ("stage_c", "stage_b", "stage_a")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"stage_c": (folder_paths.get_filename_list("diffusion_models"),)}}

    def load(self, stage_c):
        folder = folder_paths.get_full_path_or_raise("diffusion_models", stage_c).rsplit("/", 1)[0]
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(f"{folder}/{FILES['a']}"))
        return (load_stage(f"{folder}/{stage_c}", "c"), load_stage(f"{folder}/{FILES['b']}", "b"), vae)


def tiny_sdxl_vae(seed: int = 0):
    """ComfyUI's SD/SDXL VAE class (``AutoencoderKL``, 4 latent channels, 8x down) at width 32, seeded weights."""
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(embed_dim=4, ddconfig=ddconfig)
    _seeded_(vae, seed)
    sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})


class PPDTestTinySDXL:
    """The tiny SDXL from a file in diffusion_models, a tiny SDXL-shaped VAE and CLIP: what Load Checkpoint gives for a
    real SDXL (a tiny one cannot go through it, since ComfyUI detects SDXL by its real sizes)."""

    CATEGORY = "PPD test fixtures"
    RETURN_TYPES = ("MODEL", "VAE", "CLIP")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet": (folder_paths.get_filename_list("diffusion_models"),)}}

    def load(self, unet):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("diffusion_models", unet))
        return (tiny_sdxl(state_dict=sd), tiny_sdxl_vae(), tiny_sdxl_clip(seed=3))


def write_tiny_sdxl(folder: str, seed: int = 0) -> None:
    sd = tiny_sdxl(seed).model.diffusion_model.state_dict()
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in sd.items()}, f"{folder}/{SDXL_FILE}")


def text_conditioning(text: str):
    """Deterministic CLIP-G-shaped conditioning from a text hash (tiny width): tokens [1, 77, W], pooled [1, 1, W]."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, 77, TEXT_WIDTH, generator=g)
    pooled = torch.randn(1, 1, TEXT_WIDTH, generator=g)
    return [[tokens, {"pooled_output": pooled}]]


def sdxl_conditioning(text: str):
    """The same tokens as :func:`text_conditioning`, with a pooled output ``[1, SDXL_POOLED_WIDTH]`` as SDXL's ADM
    reads it."""
    [[tokens, extra]] = text_conditioning(text)
    return [[tokens, {"pooled_output": extra["pooled_output"].reshape(1, -1)[:, :SDXL_POOLED_WIDTH]}]]


class PPDTestSDXLConditioning:
    CATEGORY = "PPD test fixtures"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "", "multiline": True})}}

    def encode(self, text):
        return (sdxl_conditioning(text),)


class PPDTestTextConditioning:
    CATEGORY = "PPD test fixtures"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "", "multiline": True})}}

    def encode(self, text):
        return (text_conditioning(text),)


NODE_CLASS_MAPPINGS = {"PPDTestTinyCascade": PPDTestTinyCascade, "PPDTestTextConditioning": PPDTestTextConditioning,
                       "PPDTestTinySDXL": PPDTestTinySDXL, "PPDTestSDXLConditioning": PPDTestSDXLConditioning}
