"""Attention modules for the U-Net slots: NAS-SAM, NAS-CAM, NAS-SCAM-P/-S, CBAM, scSE.

Every module maps (B, C, H, W) -> (B, C, H, W). The NAS modules exist in a mixed form (search) and a
fixed form (one op per edge, given by a genotype slot). The mixed form's ``forward`` takes the op
weights softmax(alpha) over the op axis, shape (n_edges, n_ops), computed by the supernet that owns
alpha.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nas_core.search_space import create_cell
from nas_core.search_space.ops import CAM_OPS, SAM_OPS


class NASSAM(nn.Module):
    """Spatial attention: cell over the feature map -> map n (B, 1, H, W) -> n * x."""

    def __init__(self, channels: int, genotype: Sequence[str] | None = None, zero_op: str = "paper",
                 impl: str = "stacked"):
        super().__init__()
        self.cell = create_cell(SAM_OPS, channels, dim=2, genotype=genotype, zero_op=zero_op, impl=impl)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W); weights: (n_edges, n_sam_ops) in the mixed form
        return self.cell(x, weights) * x


class NASCAM(nn.Module):
    """Channel attention: GAP -> (B, 1, C) 1-D signal -> cell -> (B, C, 1, 1) weights -> z * x.

    The cell reads a 1-channel signal of length C, so its parameter count does not depend on C.
    """

    def __init__(self, channels: int, genotype: Sequence[str] | None = None, zero_op: str = "paper",
                 impl: str = "stacked"):
        super().__init__()
        self.cell = create_cell(CAM_OPS, 1, dim=1, genotype=genotype, zero_op=zero_op, impl=impl)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W); weights: (n_edges, n_cam_ops) in the mixed form
        b, c = x.shape[:2]
        signal = x.mean(dim=(2, 3)).view(b, 1, c)  # (B, 1, C)
        z = self.cell(signal, weights)  # (B, 1, C)
        return x * z.view(b, c, 1, 1)


class NASSCAM(nn.Module):
    """Joint module: parallel = max(SAM(x), CAM(x)) element-wise; serial = CAM(SAM(x)).

    Mixed form when both ``sam`` and ``cam`` genotype slots are None, fixed form when both are given.
    """

    def __init__(self, channels: int, combine: str, sam: Sequence[str] | None = None,
                 cam: Sequence[str] | None = None, zero_op: str = "paper", impl: str = "stacked"):
        super().__init__()
        if combine not in ("parallel", "serial"):
            raise ValueError(f"combine: {combine!r} is not one of parallel, serial")
        if (sam is None) != (cam is None):
            raise ValueError("give both the sam and the cam genotype slot (fixed form) or neither (mixed form)")
        self.combine = combine
        self.sam = NASSAM(channels, sam, zero_op, impl)
        self.cam = NASCAM(channels, cam, zero_op, impl)

    def forward(self, x: torch.Tensor, w_sam: torch.Tensor | None = None,
                w_cam: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C, H, W); w_*: op weights in the mixed form
        if self.combine == "parallel":
            return torch.maximum(self.sam(x, w_sam), self.cam(x, w_cam))
        return self.cam(self.sam(x, w_sam), w_cam)

    def extra_repr(self) -> str:
        return f"combine={self.combine}"


class CBAM(nn.Module):
    """CBAM (Woo et al. 2018): channel attention (shared MLP over avg- and max-pooled vectors), then
    spatial attention (7x7 conv over [channel mean; channel max]); each gate is a sigmoid product."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(1, channels // reduction)  # tiny C still gets one hidden unit
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        gate = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))  # (B, C)
        x = x * torch.sigmoid(gate).view(b, c, 1, 1)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return x * torch.sigmoid(self.spatial(pooled))


class SCSE(nn.Module):
    """scSE (Roy et al. 2018): cSE (squeeze-excite, reduction 2) + sSE (1x1 conv -> sigmoid), added."""

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.cse = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels),
                                 nn.Sigmoid())
        self.sse = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        channel = x * self.cse(x.mean(dim=(2, 3))).view(b, c, 1, 1)
        spatial = x * torch.sigmoid(self.sse(x))
        return channel + spatial
