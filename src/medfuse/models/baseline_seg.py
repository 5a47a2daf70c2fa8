"""Platform baseline for the segmentation task: MONAI's residual 3D UNet, registered by name."""

from __future__ import annotations

from torch import nn

from medfuse.registry import MODELS


@MODELS.register("baseline_unet3d", help="MONAI residual UNet (segmentation baseline)")
def baseline_unet3d(in_channels: int, num_classes: int, channels: tuple[int, ...] = (8, 16, 32),
                    strides: tuple[int, ...] = (2, 2), num_res_units: int = 1) -> nn.Module:
    """MONAI ``UNet``: (B, M, D, H, W) -> logits (B, K, D, H, W); D, H, W divisible by prod(strides)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=tuple(channels),
                strides=tuple(strides), num_res_units=num_res_units)
