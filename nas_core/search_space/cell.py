"""The 4-node attention cell shared by NAS-SAM (2-D) and NAS-CAM (1-D), method.md section 3.

Node 0 is the input (``c_in`` channels), nodes 1..N-1 are hidden (32 channels), node N is the
1-channel output map. Every edge (i -> j), i < j, carries ops from an op table; the activation is
ReLU on edges into hidden nodes and sigmoid on edges into the output node, which is then divided by
its in-degree so the map stays in [0, 1].

Two forms share this class:
- mixed (search): ``Cell(..., genotype=None)``; ``forward(x, weights)`` with ``weights`` =
  softmax(alpha) over the op axis, shape (n_edges, n_ops), **already softmaxed** by the supernet that
  owns alpha (once per forward for all slots). edge(x) = sum_o weights_o * act(BN(conv_o(x))).
- fixed (retrain): ``Cell(..., genotype=("conv3", "zero", ...))`` with one op name per edge;
  ``forward(x)``. Ops whose destination node cannot reach the output are not built (the output is
  identical: such a node only feeds Zero edges, which ignore their input).

``zero_op``: a name in ``ZERO_OPS``, the table of what a Zero op contributes on the edges into the output
node (sigmoid edges; 0 on ReLU edges always): "paper" -> exactly 0; "code" (the authors' release) ->
sigmoid(0) = 0.5. The names are those of the protocol that brought each in; a protocol's record
(nas_core.config.PROTOCOLS) names one, and a new zero op is one entry here.

This class is the reference implementation ("reference": one conv -> BN -> act per op and edge,
stacked and weighted, ``edge_outputs``). ``StackedCell`` (nas_core/search_space/stacked.py) is a
subclass that computes the same mixed-form function faster (the ops of all edges leaving one node that
share a kernel shape run as one conv with stacked output channels and one BatchNorm over the stack; the
op weight of a ReLU edge is folded into that BN's affine). Parameters stay per op, so state_dicts are
interchangeable between the two; ``create_cell(..., impl=...)`` (nas_core/search_space/__init__.py)
picks one by name. The fixed form is the same either way.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nas_core.search_space.ops import HIDDEN_CHANNELS, N_NODES, OpSpec, edge_list, make_op, num_edges

# zero op name -> the value a Zero op contributes on a sigmoid edge (method.md sections 3 and 5)
ZERO_OPS: dict[str, float] = {"paper": 0.0, "code": 0.5}


class Cell(nn.Module):
    """DAG cell: (B, c_in, *S) -> (B, 1, *S) in [0, 1]; S = (H, W) for dim 2, (L,) for dim 1."""

    impl = "reference"  # the name ``create_cell`` knows this implementation by

    def __init__(
        self,
        ops: Mapping[str, OpSpec],
        c_in: int,
        dim: int,
        genotype: Sequence[str] | None = None,
        zero_op: str = "paper",
        n_nodes: int = N_NODES,
        hidden: int = HIDDEN_CHANNELS,
    ):
        super().__init__()
        if zero_op not in ZERO_OPS:
            raise ValueError(f"zero_op: {zero_op!r} is not one of {', '.join(ZERO_OPS)}")
        if dim not in (1, 2):
            raise ValueError(f"dim must be 1 or 2, got {dim}")
        self.op_names = tuple(ops)
        self.dim, self.zero_op, self.n_nodes = dim, zero_op, n_nodes
        self.zero_value = ZERO_OPS[zero_op]  # a Zero op's output on a sigmoid edge
        self.edges = edge_list(n_nodes)
        self.channels = [c_in] + [hidden] * (n_nodes - 1) + [1]
        self.mixed = genotype is None
        if self.mixed:
            chosen = [self.op_names] * len(self.edges)
        else:
            chosen = [(name,) for name in self._check_genotype(genotype)]
            live = self._live_nodes([c[0] for c in chosen])
            # edges into a dead node are dropped entirely (their value is never read)
            chosen = [c if dst in live else () for c, (_, dst) in zip(chosen, self.edges)]
        self.chosen: list[tuple[str, ...]] = chosen
        self.ops = nn.ModuleList()
        for names, (src, dst) in zip(chosen, self.edges):
            built = {n: make_op(ops[n], self.channels[src], self.channels[dst], dim) for n in names}
            self.ops.append(nn.ModuleDict({n: m for n, m in built.items() if m is not None}))

    # ---- construction helpers ----
    def _check_genotype(self, genotype: Sequence[str]) -> tuple[str, ...]:
        names = tuple(genotype)
        if len(names) != num_edges(self.n_nodes):
            raise ValueError(f"cell genotype needs {num_edges(self.n_nodes)} op names, got {len(names)}")
        for e, name in enumerate(names):
            if name not in self.op_names:
                raise ValueError(f"edge {e}: unknown op {name!r}; valid: {', '.join(self.op_names)}")
        return names

    def _live_nodes(self, names: Sequence[str]) -> set[int]:
        """Nodes whose value reaches the output through non-zero edges (the output is always live)."""
        live = {self.n_nodes}
        for node in range(self.n_nodes - 1, 0, -1):
            if any(n != "zero" and src == node and dst in live for n, (src, dst) in zip(names, self.edges)):
                live.add(node)
        return live

    def _zero_value(self, dst: int) -> float:
        return self.zero_value if dst == self.n_nodes else 0.0

    def _act(self, y: torch.Tensor, dst: int) -> torch.Tensor:
        return torch.sigmoid(y) if dst == self.n_nodes else F.relu(y)

    # ---- the per-op seam ----
    def edge_outputs(self, edge: int, x: torch.Tensor) -> torch.Tensor:
        """Activated outputs of every op on ``edge``, in table order, Zero included.

        x: (B, C_src, *S) -> (n_ops, B, C_dst, *S). A faster implementation must match this exactly.
        """
        dst = self.edges[edge][1]
        modules = self.ops[edge]
        outs = {n: self._act(m(x), dst) for n, m in modules.items()}
        # the Zero output takes the dtype of the conv outputs (they differ from x under autocast)
        like = next(iter(outs.values()), x)
        zero = like.new_full((x.shape[0], self.channels[dst], *x.shape[2:]), self._zero_value(dst))
        return torch.stack([outs.get(n, zero) for n in self.chosen[edge]])

    # ---- forward ----
    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, c_in, *S); weights: softmax(alpha) (n_edges, n_ops), mixed form only -> (B, 1, *S)."""
        self._check_weights(weights)
        return self._reference_forward(x, weights)

    def _check_weights(self, weights: torch.Tensor | None) -> None:
        if self.mixed:
            expected = (len(self.edges), len(self.op_names))
            if weights is None or tuple(weights.shape) != expected:
                got = None if weights is None else tuple(weights.shape)
                raise ValueError(f"mixed cell needs op weights of shape {expected}, got {got}")
        elif weights is not None:
            raise ValueError("a fixed cell takes no op weights")

    def _reference_forward(self, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        nodes = [x]
        for dst in range(1, self.n_nodes + 1):
            total = None
            const = 0.0
            for e, (src, d) in enumerate(self.edges):
                if d != dst:
                    continue
                if self.mixed:
                    stacked = self.edge_outputs(e, nodes[src])  # (n_ops, B, C, *S)
                    w = weights[e].to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
                    value = (w * stacked).sum(0)
                elif self.chosen[e] and self.chosen[e][0] != "zero":
                    value = self._act(self.ops[e][self.chosen[e][0]](nodes[src]), dst)
                else:
                    # fixed Zero edge (or an edge into a dead node): a constant, input ignored
                    const += self._zero_value(dst)
                    continue
                total = value if total is None else total + value
            if total is None:
                shape = (x.shape[0], self.channels[dst], *x.shape[2:])
                total = x.new_full(shape, const)
            elif const:
                total = total + const
            nodes.append(total)
        in_degree = sum(1 for _, d in self.edges if d == self.n_nodes)
        return nodes[-1] / in_degree

    def extra_repr(self) -> str:
        form = "mixed" if self.mixed else "fixed " + ",".join(c[0] if c else "-" for c in self.chosen)
        impl = f", impl={self.impl}" if self.mixed else ""
        return f"dim={self.dim}, {form}, zero_op={self.zero_op}{impl}"
