"""The one U-Net skeleton (method.md section 2) with 8 named attention slots, and the NAS-SCAM supernet.

The plain U-Net, CBAM, scSE, the fixed NAS-SCAM nets and the supernet are all this skeleton with a
different attention factory; the supernet only adds the alpha parameters and passes them to its slots.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from nas_core.models.attention import NASSCAM
from nas_core.search_space.genotype import N_SLOTS, Genotype
from nas_core.search_space.ops import CAM_OPS, N_NODES, SAM_OPS, num_edges

# (slot index, slot channels) -> module mapping (B, C, H, W) -> (B, C, H, W)
AttentionFactory = Callable[[int, int], nn.Module]


class SegmentationModel(nn.Module):
    """What every registry model offers: alpha/weight parameter split, input checks, its rebuild spec.

    ``model_spec`` = {"name": ..., "options": {...}} is set by ``registry.create_model`` so that
    ``create_model(spec["name"], **spec["options"])`` rebuilds the same architecture.
    """

    model_spec: dict[str, Any] | None = None
    in_channels: int = 3
    size_multiple: int = 16

    def arch_parameters(self) -> list[nn.Parameter]:
        return []

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"{type(self).__name__}: input height and width must be multiples of {self.size_multiple}, "
                f"got {h}x{w}"
            )


class DoubleConv(nn.Sequential):
    """Conv3x3 -> GroupNorm(4) -> ReLU -> Dropout(0.2) -> Conv3x3 -> GroupNorm(4) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, groups: int = 4, dropout: float = 0.2):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True),
        )


class UNet(SegmentationModel):
    """(B, 3, H, W) -> (B, 4, H, W) sigmoid probabilities; H, W multiples of 2**depth.

    Slots, in forward order: down1..down{depth} (after each pool, shallow -> deep), then
    up1..up{depth} (after each up block, deep -> shallow). ``attention=None`` leaves them empty.
    """

    def __init__(self, attention: AttentionFactory | None = None, in_channels: int = 3, out_channels: int = 4,
                 base: int = 16, depth: int = 4):
        super().__init__()
        self.in_channels, self.depth, self.size_multiple = in_channels, depth, 2 ** depth
        widths = [base * 2 ** k for k in range(depth + 1)]  # 16, 32, 64, 128, 256
        self.slot_names = tuple(f"down{k}" for k in range(1, depth + 1)) + tuple(f"up{k}" for k in range(1, depth + 1))
        self.slot_channels = tuple(widths[1:]) + tuple(reversed(widths[:-1]))  # 32..256, 128..16
        factory = attention or (lambda index, channels: nn.Identity())
        self.inc = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(DoubleConv(widths[k], widths[k + 1]), nn.MaxPool2d(2)) for k in range(depth)
        )
        self.middle = DoubleConv(widths[-1], widths[-1])
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[k + 1], widths[k], 4, stride=2, padding=1) for k in reversed(range(depth))
        )
        self.up_conv = nn.ModuleList(DoubleConv(widths[k + 1], widths[k]) for k in reversed(range(depth)))
        self.attention = nn.ModuleDict(
            {name: factory(i, c) for i, (name, c) in enumerate(zip(self.slot_names, self.slot_channels))}
        )
        self.out = nn.Conv2d(widths[0], out_channels, 1)

    def slot_context(self) -> Any:
        """Computed once per forward and handed to every ``attend`` call (the supernet's op weights)."""
        return None

    def attend(self, index: int, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        """Apply slot ``index`` (0..2*depth-1) to x: (B, C_slot, h, w) -> same shape."""
        return self.attention[self.slot_names[index]](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        context = self.slot_context()
        h = self.inc(x)  # (B, 16, H, W)
        skips = [h]
        for k, block in enumerate(self.down):
            h = self.attend(k, block(h), context)  # (B, 2w, H/2^(k+1), W/2^(k+1))
            skips.append(h)
        h = self.middle(h)  # (B, 256, H/16, W/16)
        for k, (up, conv) in enumerate(zip(self.up, self.up_conv)):
            h = torch.cat([skips[self.depth - 1 - k], up(h)], dim=1)
            h = self.attend(self.depth + k, conv(h), context)
        # sigmoid in float32: under bf16 autocast the logits are bf16, and a bf16 sigmoid rounds
        # probabilities near 1 to exactly 1 (8 mantissa bits), which the log terms of the loss cannot take
        return torch.sigmoid(self.out(h).float())  # (B, 4, H, W) float32


class NASSCAMSupernet(UNet):
    """U-Net whose 8 slots are mixed NAS-SCAM modules driven by registered alpha logits.

    synchronous: alpha_sam (8, n_edges, n_sam_ops), alpha_cam (8, n_edges, n_cam_ops), one per slot.
    shared: alpha_sam (n_edges, n_sam_ops), alpha_cam (n_edges, n_cam_ops) used by every slot
    (conv/BN weights stay per slot). Initialised 1e-3 * N(0, 1).
    """

    def __init__(self, combine: str, search: str = "synchronous", zero_op: str = "paper", impl: str = "stacked"):
        if search not in ("synchronous", "shared"):
            raise ValueError(f"supernet: {search!r} is not one of synchronous, shared")

        def factory(index: int, channels: int) -> nn.Module:
            return NASSCAM(channels, combine, zero_op=zero_op, impl=impl)

        super().__init__(factory)
        if len(self.slot_names) != N_SLOTS:
            raise ValueError(f"the supernet needs {N_SLOTS} slots, the skeleton has {len(self.slot_names)}")
        self.combine, self.search = combine, search
        prefix = (N_SLOTS,) if search == "synchronous" else ()
        edges = num_edges(N_NODES)
        self.alpha_sam = nn.Parameter(1e-3 * torch.randn(*prefix, edges, len(SAM_OPS)))
        self.alpha_cam = nn.Parameter(1e-3 * torch.randn(*prefix, edges, len(CAM_OPS)))

    def slot_context(self) -> dict[str, torch.Tensor]:
        # softmax once per forward; slots get non-leaf tensors, never the Parameter itself (module
        # hooks such as FlopCounterMode's cannot handle a grad-requiring leaf input under no_grad)
        return {"sam": torch.softmax(self.alpha_sam, dim=-1), "cam": torch.softmax(self.alpha_cam, dim=-1)}

    def attend(self, index: int, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        module = self.attention[self.slot_names[index]]
        if self.search == "synchronous":
            return module(x, context["sam"][index], context["cam"][index])
        return module(x, context["sam"], context["cam"])

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_sam, self.alpha_cam]

    def alphas(self) -> dict[str, torch.Tensor]:
        """Detached copies of the raw logits: {"sam": alpha_sam, "cam": alpha_cam}."""
        return {"sam": self.alpha_sam.detach().clone(), "cam": self.alpha_cam.detach().clone()}

    def genotype(self) -> Genotype:
        """Argmax over the op axis for every slot and edge, Zero included (method.md section 3)."""
        cells = {}
        for kind, alpha, names in (("sam", self.alpha_sam, list(SAM_OPS)), ("cam", self.alpha_cam, list(CAM_OPS))):
            idx = alpha.detach().argmax(dim=-1).cpu()
            if self.search == "shared":
                idx = idx.expand(N_SLOTS, *idx.shape)
            cells[kind] = tuple(tuple(names[i] for i in row.tolist()) for row in idx)
        return Genotype(self.combine, self.search, cells["sam"], cells["cam"])
