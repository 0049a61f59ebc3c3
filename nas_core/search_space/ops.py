"""The op tables of the NAS-SCAM search space (method.md section 3).

Everything shape-like in the search space (edge count, edge list, alpha shapes, genotype sizes) is
derived from the tables and the node count below; nothing downstream types in a 6 or an 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping

from torch import nn


@dataclass(frozen=True)
class OpSpec:
    """One candidate op: ``zero`` (no connection) or a stride-1 "same"-padded conv followed by BN."""

    name: str
    kind: Literal["zero", "conv"]
    kernel: int = 0
    dilation: int = 1

    @property
    def padding(self) -> int:
        # odd kernels only, so symmetric padding keeps the length ("same")
        return self.dilation * (self.kernel - 1) // 2


def _table(*specs: OpSpec) -> Mapping[str, OpSpec]:
    # read-only view: the index order is part of the public contract (alpha columns)
    return MappingProxyType({s.name: s for s in specs})


# NAS-SAM, 2-D ops on (B, C, H, W); index order = alpha column order.
SAM_OPS: Mapping[str, OpSpec] = _table(
    OpSpec("zero", "zero"),
    OpSpec("conv1", "conv", 1),
    OpSpec("conv3", "conv", 3),
    OpSpec("conv5", "conv", 5),
    OpSpec("atrous3", "conv", 3, 2),
    OpSpec("atrous5", "conv", 5, 2),
)

# NAS-CAM, 1-D ops on the (B, 1, C) channel signal.
CAM_OPS: Mapping[str, OpSpec] = _table(
    OpSpec("zero", "zero"),
    OpSpec("conv1", "conv", 1),
    OpSpec("conv3", "conv", 3),
    OpSpec("conv5", "conv", 5),
    OpSpec("conv9", "conv", 9),
    OpSpec("conv15", "conv", 15),
    OpSpec("atrous3", "conv", 3, 2),
    OpSpec("atrous5", "conv", 5, 2),
)

OP_TABLES: Mapping[str, Mapping[str, OpSpec]] = MappingProxyType({"sam": SAM_OPS, "cam": CAM_OPS})

# Cell topology: node 0 is the input; N_NODES non-input nodes, the last one is the 1-channel output.
N_NODES = 3
HIDDEN_CHANNELS = 32


def num_edges(n_nodes: int = N_NODES) -> int:
    """Edges of the fully connected DAG with ``n_nodes`` non-input nodes: n(n+1)/2 (3 -> 6)."""
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
    return n_nodes * (n_nodes + 1) // 2


def edge_list(n_nodes: int = N_NODES) -> list[tuple[int, int]]:
    """Edges ``(src, dst)`` grouped by destination: [(0,1), (0,2), (1,2), (0,3), (1,3), (2,3)] for 3."""
    edges = [(src, dst) for dst in range(1, n_nodes + 1) for src in range(dst)]
    assert len(edges) == num_edges(n_nodes)  # internal invariant, not user input
    return edges


def make_op(spec: OpSpec, c_in: int, c_out: int, dim: int) -> nn.Module | None:
    """Conv(bias, same padding) -> BatchNorm for ``dim`` 1 or 2; ``None`` for the zero op.

    Maps (B, c_in, *S) -> (B, c_out, *S) with S = (L,) for dim 1 or (H, W) for dim 2.
    """
    if spec.kind == "zero":
        return None
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim]
    return nn.Sequential(
        conv(c_in, c_out, spec.kernel, padding=spec.padding, dilation=spec.dilation, bias=True),
        norm(c_out),
    )
