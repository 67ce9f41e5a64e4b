"""CLIP image preprocessing: EXIF orientation, RGB, channel order, bicubic resize, centre crop, normalise.

The released LLaMA-Adapter V2 checkpoints were trained and evaluated on images read with `cv2.imread` and
handed to PIL as if they were RGB, i.e. with red and blue swapped (spec §2.4). `channel_order="bgr"`
reproduces that and is the default for adapter checkpoints; "rgb" is the natural order.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ChannelOrder = Literal["bgr", "rgb"]


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert to 3-channel RGB (alpha dropped, greyscale expanded, like cv2)."""
    return ImageOps.exif_transpose(image).convert("RGB")


def clip_transform(image: Image.Image, size: int = 224, channel_order: ChannelOrder = "bgr") -> torch.Tensor:
    """PIL image → normalised float tensor (3, size, size)."""
    # torchvision is imported here, where images are used: a plain chat model never pays its ~200 MB
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = to_rgb(image)
    if channel_order == "bgr":
        image = Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., ::-1]))
    elif channel_order != "rgb":
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', not {channel_order!r}")
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, size)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)
