"""The authors' release, per iteration: the baseline every speed figure of bench/step.py is a ratio against.

Written here from a description of the release (ZuhaoLiu/NAS-SCAM: network_search.py, network_rebuild.py,
primitives.py, conv_modules.py, train_functions.py); no code of it is used. What it does and this module
does the same way:
- every edge of every cell holds one Conv -> BN per candidate op, run one after the other; each output
  goes through the edge's activation (ReLU into hidden nodes, sigmoid into the output node), is scaled
  by its softmax weight and accumulated;
- the Zero op is a real 1x1 conv whose output is multiplied by 0 (so it is computed, and back-propagated
  through, every step); the release then applies the edge's activation to it, i.e. sigmoid(0) = 0.5 on
  edges into the output node (``zero_op="code"``). With ``zero_op="paper"`` the zeroed conv output is
  added without activation (the same function as our "paper" cells, at the release's cost);
- the fixed (retrain) network builds the chosen op of every edge, Zero included as the same zeroed
  conv, and prunes nothing;
- optimisers: ``torch.optim.Adam`` per tensor (``foreach=False, fused=False``); the search alternates
  weight and alpha updates by setting ``requires_grad`` on the other group to False (so a w step computes
  no alpha gradients and an alpha step no weight gradients, but both run the full forward and backward
  through every op, Zero convs included), all in float32.

The U-Net skeleton is ours (the release's DoubleConv / Down / Up / OutConv are the same layers); only the
attention cells differ. Parameter names mirror ``nas_core``'s reference cells, so a reference supernet's
``state_dict`` loads here with ``strict=False`` (the missing keys are exactly the Zero convs).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nas_core.models.unet import NASSCAMSupernet, UNet
from nas_core.search_space import CAM_OPS, HIDDEN_CHANNELS, N_NODES, SAM_OPS, Genotype, edge_list, make_op


class ReleaseCell(nn.Module):
    """(B, c_in, *S) -> (B, 1, *S): the 4-node cell with one module per (edge, op), nothing pruned.

    Mixed form (``genotype=None``): ``forward(x, weights)`` with weights (n_edges, n_ops). Fixed form: one
    op per edge by name.
    """

    def __init__(self, table, c_in: int, dim: int, zero_op: str, genotype: Sequence[str] | None = None):
        super().__init__()
        self.dim, self.zero_op, self.edges = dim, zero_op, edge_list(N_NODES)
        self.channels = [c_in] + [HIDDEN_CHANNELS] * (N_NODES - 1) + [1]
        self.mixed = genotype is None
        chosen = [tuple(table)] * len(self.edges) if self.mixed else [(name,) for name in genotype]
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
        self.ops = nn.ModuleList()
        for names, (src, dst) in zip(chosen, self.edges):
            c_src, c_dst = self.channels[src], self.channels[dst]
            self.ops.append(nn.ModuleDict({
                n: conv(c_src, c_dst, 1) if table[n].kind == "zero" else make_op(table[n], c_src, c_dst, dim)
                for n in names
            }))

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        nodes = [x]
        for dst in range(1, N_NODES + 1):
            act = torch.sigmoid if dst == N_NODES else F.relu
            total = None
            for e, (src, d) in enumerate(self.edges):
                if d != dst:
                    continue
                for i, (name, module) in enumerate(self.ops[e].items()):
                    y = module(nodes[src])
                    if name == "zero":
                        y = y * 0.0
                        y = act(y) if self.zero_op == "code" else y
                    else:
                        y = act(y)
                    term = weights[e, i] * y if self.mixed else y
                    total = term if total is None else total + term
            nodes.append(total)
        return nodes[-1] / N_NODES  # the output node's in-degree is N_NODES


class ReleaseSAM(nn.Module):
    """(B, C, H, W) -> cell map (B, 1, H, W) * x."""

    def __init__(self, channels: int, zero_op: str, genotype: Sequence[str] | None = None):
        super().__init__()
        self.cell = ReleaseCell(SAM_OPS, channels, 2, zero_op, genotype)

    def forward(self, x, weights=None):
        return self.cell(x, weights) * x


class ReleaseCAM(nn.Module):
    """(B, C, H, W) -> GAP as a (B, 1, C) signal -> cell -> (B, C, 1, 1) weights * x."""

    def __init__(self, zero_op: str, genotype: Sequence[str] | None = None):
        super().__init__()
        self.cell = ReleaseCell(CAM_OPS, 1, 1, zero_op, genotype)

    def forward(self, x, weights=None):
        b, c = x.shape[:2]
        return x * self.cell(x.mean(dim=(2, 3)).view(b, 1, c), weights).view(b, c, 1, 1)


class ReleaseSCAM(nn.Module):
    """parallel: max(SAM(x), CAM(x)); serial: CAM(SAM(x))."""

    def __init__(self, channels: int, combine: str, zero_op: str, sam=None, cam=None):
        super().__init__()
        self.combine = combine
        self.sam, self.cam = ReleaseSAM(channels, zero_op, sam), ReleaseCAM(zero_op, cam)

    def forward(self, x, w_sam=None, w_cam=None):
        if self.combine == "parallel":
            return torch.maximum(self.sam(x, w_sam), self.cam(x, w_cam))
        return self.cam(self.sam(x, w_sam), w_cam)


class ReleaseSupernet(NASSCAMSupernet):
    """The release's SearchNet: our supernet's skeleton and alpha (8, n_edges, n_ops), release cells."""

    def __init__(self, combine: str = "parallel", zero_op: str = "paper"):
        super().__init__(combine, "synchronous", zero_op=zero_op, impl="reference")
        self.attention = nn.ModuleDict({
            name: ReleaseSCAM(c, combine, zero_op) for name, c in zip(self.slot_names, self.slot_channels)
        })


class ReleaseFixedNet(UNet):
    """The release's RebuildNet for ``genotype``: every edge's chosen op built, Zero as a zeroed conv."""

    def __init__(self, genotype: Genotype, zero_op: str = "paper"):
        def factory(index: int, channels: int) -> nn.Module:
            return ReleaseSCAM(channels, genotype.combine, zero_op, genotype.sam[index], genotype.cam[index])

        super().__init__(factory)


def release_adam(params, lr: float) -> torch.optim.Optimizer:
    """The release's optimiser: torch.optim.Adam one tensor at a time (its torch predates foreach)."""
    return torch.optim.Adam(params, lr=lr, foreach=False, fused=False)
