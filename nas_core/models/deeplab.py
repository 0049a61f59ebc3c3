"""DeepLabV3+ (Chen et al. 2018) with a small ResNet-style encoder written here, trained from scratch.

The paper names neither backbone nor pretraining and nothing can be downloaded here, so (our choice,
method.md section 4): a ResNet-18-shaped encoder of BasicBlocks with half the usual widths
(32, 64, 128, 256), output stride 16 (the last stage dilates instead of striding), ASPP with rates
6/12/18 + image pooling (128 channels), the stride-4 low-level features projected to 48 channels,
two 3x3 decoder convs, bilinear upsampling to the input size and a per-class sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nas_core.models.unet import SegmentationModel


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, pad, dilation, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = _conv_bn_relu(c_in, c_out, 3, stride, dilation)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, dilation, dilation, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def _stage(c_in: int, c_out: int, blocks: int, stride: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(BasicBlock(c_in, c_out, stride, dilation),
                         *(BasicBlock(c_out, c_out, 1, dilation) for _ in range(blocks - 1)))


class ASPP(nn.Module):
    """(B, C_in, h, w) -> (B, C_out, h, w): 1x1 + three atrous 3x3 + image pooling, concatenated, 1x1."""

    def __init__(self, c_in: int, c_out: int, rates: tuple[int, ...] = (6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(c_in, c_out, 1)] +
                                      [_conv_bn_relu(c_in, c_out, 3, dilation=r) for r in rates])
        # no BatchNorm on the 1x1 pooled branch: it would fail on a batch of one in training mode
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(c_out * (len(rates) + 2), c_out, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [b(x) for b in self.branches]
        feats.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(feats, dim=1))


class DeepLabV3Plus(SegmentationModel):
    """(B, 3, H, W) -> (B, 4, H, W) sigmoid probabilities; H, W multiples of 16."""

    def __init__(self, in_channels: int = 3, out_channels: int = 4, widths: tuple[int, ...] = (32, 64, 128, 256),
                 blocks: int = 2, aspp_channels: int = 128, low_level_channels: int = 48):
        super().__init__()
        self.in_channels = in_channels
        w0, w1, w2, w3 = widths
        stem_width = w0
        self.stem = nn.Sequential(_conv_bn_relu(in_channels, stem_width, 3, 2), _conv_bn_relu(stem_width, stem_width),
                                  nn.MaxPool2d(3, 2, 1))  # 1/4
        self.layer1 = _stage(stem_width, w0, blocks, 1)  # 1/4, low-level features
        self.layer2 = _stage(w0, w1, blocks, 2)  # 1/8
        self.layer3 = _stage(w1, w2, blocks, 2)  # 1/16
        self.layer4 = _stage(w2, w3, blocks, 1, dilation=2)  # 1/16: output stride 16
        self.aspp = ASPP(w3, aspp_channels)
        self.low_level = _conv_bn_relu(w0, low_level_channels, 1)
        self.decoder = nn.Sequential(_conv_bn_relu(aspp_channels + low_level_channels, aspp_channels),
                                     _conv_bn_relu(aspp_channels, aspp_channels))
        self.head = nn.Conv2d(aspp_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        low = self.layer1(self.stem(x))  # (B, w0, H/4, W/4)
        deep = self.aspp(self.layer4(self.layer3(self.layer2(low))))  # (B, aspp, H/16, W/16)
        deep = F.interpolate(deep, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.head(self.decoder(torch.cat([deep, self.low_level(low)], dim=1)))  # (B, 4, H/4, W/4)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(y)
