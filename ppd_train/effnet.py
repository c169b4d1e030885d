"""Stable Cascade's Stage C image encoder (EfficientNetV2-S features + a 1x1 mapper to 16 channels), without
torchvision.

Stability builds it as ``torchvision.models.efficientnet_v2_s().features`` plus a mapper; torchvision cannot be
imported next to every torch build, so the same architecture is written here with **the same module names**, and the
released ``effnet_encoder.safetensors`` (keys ``backbone.0.0.weight`` ... ``mapper.1.running_var``) loads as is.
Images are resized (shorter side) and centre-cropped to ``image_size`` (768 -> 24x24 latents, Stage C's 1024^2 size),
scaled to [0, 1] and normalised with ImageNet statistics, as in Stability's ``train_c.py``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import FileFormatError
from .safetensors_io import read_safetensors

# (block, expand ratio, kernel, stride, in, out, layers) of efficientnet_v2_s
_STAGES = [("fused", 1, 3, 1, 24, 24, 2), ("fused", 4, 3, 2, 24, 48, 4), ("fused", 4, 3, 2, 48, 64, 4),
           ("mb", 4, 3, 2, 64, 128, 6), ("mb", 6, 3, 1, 128, 160, 9), ("mb", 6, 3, 2, 160, 256, 15)]
_BN_EPS = 1e-3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvNormAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: ``0`` conv (no bias), ``1`` BatchNorm, ``2`` SiLU (optional)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout, eps=_BN_EPS)]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


class _Block(nn.Module):
    def __init__(self, kind: str, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = stride == 1 and cin == cout
        hidden = cin * expand
        layers: list[nn.Module]
        if kind == "fused":
            layers = ([ConvNormAct(cin, hidden, kernel, stride), ConvNormAct(hidden, cout, 1, act=False)]
                      if hidden != cin else [ConvNormAct(cin, cout, kernel, stride)])
        else:
            layers = [ConvNormAct(cin, hidden, 1), ConvNormAct(hidden, hidden, kernel, stride, groups=hidden),
                      SqueezeExcitation(hidden, max(1, cin // 4)), ConvNormAct(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out  # stochastic depth is identity at inference


def efficientnet_v2_s_features() -> nn.Sequential:
    stages: list[nn.Module] = [ConvNormAct(3, 24, 3, 2)]
    for kind, expand, kernel, stride, cin, cout, layers in _STAGES:
        stages.append(nn.Sequential(*[_Block(kind, expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout,
                                             cout) for i in range(layers)]))
    stages.append(ConvNormAct(256, 1280, 1))
    return nn.Sequential(*stages)


class EfficientNetEncoder(nn.Module):
    def __init__(self, c_latent: int = 16) -> None:
        super().__init__()
        self.backbone = efficientnet_v2_s_features()
        self.mapper = nn.Sequential(nn.Conv2d(1280, c_latent, 1, bias=False), nn.BatchNorm2d(c_latent, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))


def load_effnet(path: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> EfficientNetEncoder:
    """Load Stability's ``effnet_encoder.safetensors`` (safetensors only)."""
    tensors, _ = read_safetensors(path, "EfficientNet encoder")
    tensors = {k.removeprefix("state_dict."): v for k, v in tensors.items()}
    model = EfficientNetEncoder()
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k in tensors if k in expected and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise FileFormatError(f"{path} is not Stable Cascade's EfficientNet encoder (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, wrong shape {wrong[:3]}). Use effnet_encoder.safetensors from "
                              "stabilityai/stable-cascade.")
    model.load_state_dict(tensors, strict=False)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def preprocess(images: list[Image.Image], image_size: int = 768) -> torch.Tensor:
    """RGB images -> ``[B, 3, S, S]``: shorter side to ``S`` (bicubic), centre crop, ImageNet normalisation."""
    out = []
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for img in images:
        scale = image_size / min(img.size)
        w, h = max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale))
        img = img.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - mean) / std)
    return torch.stack(out)
