"""The "stacked" mixed cell: ``StackedCell``, a ``Cell`` that computes the reference function faster.

Reference (``Cell``), per edge e = (i -> j):  edge(x) = sum_o w[e, o] * act_j(BN_eo(conv_eo(x_i))).

Here every node i is read once per kernel shape: the convs of all edges leaving i that share op o are
one convolution whose output channels are the edges' channels stacked (C_tot = sum of the edges'
destination channels), followed by one batch_norm over C_tot channels. Both are exact: a conv's
output channels are independent, and BatchNorm normalises each channel with its own statistics.

The op weight of a ReLU edge goes into the BN affine: w * relu(g * n + b) = relu((w g) * n + w b) for
w >= 0 (w is a softmax, so it is), which saves one full-size multiply per op; the sum over ops then
is a plain sum of ReLU outputs, and each destination node takes its channel range of it. Sigmoid
edges (into the 1-channel output node) keep w * sigmoid(.) on their one channel.

Parameters stay in the per-op modules the parent class builds (same state_dict as the reference
form): conv weights, biases and BN affine/running stats are concatenated at forward time (cheap: a few
KB) and the updated running statistics are copied back, so checkpoints load into either form. The
fixed form (a genotype) has one op per edge and nothing to stack: it runs the parent's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from nas_core.search_space.cell import Cell
from nas_core.search_space.ops import HIDDEN_CHANNELS, N_NODES, OpSpec


@dataclass(frozen=True)
class _Source:
    """The edges leaving one node: their indices, destinations and channel ranges in the stack."""

    node: int
    edges: tuple[int, ...]
    dsts: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...]  # channel range of each edge in the stacked output
    n_relu: int  # channels [0, n_relu) feed hidden nodes (ReLU); the rest feed the output (sigmoid)
    total: int


class StackedCell(Cell):
    """``Cell`` whose mixed form groups its ops by (source node, op); same function, same state_dict."""

    impl = "stacked"

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
        super().__init__(ops, c_in, dim, genotype=genotype, zero_op=zero_op, n_nodes=n_nodes, hidden=hidden)
        # 2-D convs run in channels_last (see ``_stacked_forward``); a plain attribute so benchmarks
        # can switch it off
        self.channels_last = True
        # the static grouping: plain values, no tensors or parameters
        self.conv_ops = tuple(i for i, n in enumerate(self.op_names) if ops[n].kind == "conv")
        self.conv_names = tuple(self.op_names[i] for i in self.conv_ops)
        self.specs = tuple(ops[n] for n in self.conv_names)
        self.zero_ops = tuple(i for i, n in enumerate(self.op_names) if ops[n].kind == "zero")
        self.out = self.n_nodes
        self.sources = []
        for node in range(self.n_nodes):
            leaving = [(e, d) for e, (s, d) in enumerate(self.edges) if s == node]
            # hidden destinations first, the output node last: one contiguous ReLU block
            leaving.sort(key=lambda ed: (ed[1] == self.n_nodes, ed[1]))
            bounds, start = [], 0
            for _, d in leaving:
                bounds.append((start, start + self.channels[d]))
                start += self.channels[d]
            n_relu = sum(self.channels[d] for _, d in leaving if d != self.n_nodes)
            assert start - n_relu == 1  # internal invariant: every node has one edge into the 1-channel output
            self.sources.append(_Source(node, tuple(e for e, _ in leaving), tuple(d for _, d in leaving),
                                        tuple(bounds), n_relu, start))
        self.in_degree = sum(1 for _, d in self.edges if d == self.n_nodes)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, c_in, *S); weights: softmax(alpha) (n_edges, n_ops), mixed form only -> (B, 1, *S)."""
        self._check_weights(weights)
        if not self.mixed:
            return self._reference_forward(x, weights)
        return self._stacked_forward(x, weights)

    def _stacked_forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.dim == 2 else F.conv1d
        # channels_last lets oneDNN (CPU) and cuDNN (GPU) skip layout reorders around every conv
        fmt = torch.channels_last if self.dim == 2 and self.channels_last else None
        conv_idx = list(self.conv_ops)
        acc: dict[int, torch.Tensor] = {}
        nodes = [x]
        for src in self.sources:
            inp = nodes[src.node]
            if fmt is not None:
                inp = inp.contiguous(memory_format=fmt)
            relu_sum, sig_sum = self._source(src, inp, weights, conv, conv_idx)
            hidden = [(d, hi - lo) for d, (lo, hi) in zip(src.dsts, src.bounds) if d != self.out]
            if hidden:
                parts = relu_sum.split([n for _, n in hidden], dim=1) if len(hidden) > 1 else (relu_sum,)
                for (d, _), part in zip(hidden, parts):
                    acc[d] = part if d not in acc else acc[d] + part
            if sig_sum is not None:
                acc[self.out] = sig_sum if self.out not in acc else acc[self.out] + sig_sum
            if src.node + 1 < self.out:
                nodes.append(acc.pop(src.node + 1))  # complete: every edge into it has been added
        out = acc[self.out]
        if self.zero_value and self.zero_ops:
            # Zero on a sigmoid edge contributes w * zero_value (the release's form: sigmoid(0) = 0.5)
            sig_edges = [e for e, (_, d) in enumerate(self.edges) if d == self.out]
            out = out + self.zero_value * weights[sig_edges][:, list(self.zero_ops)].sum().to(out.dtype)
        return out / self.in_degree

    def _groups(self, src: _Source, dim: int) -> list[tuple[tuple[int, ...], int, int]]:
        """Conv groups for one source: (op positions in ``conv_names``, kernel, dilation).

        Big stacks run one conv per op. A small stack (the 1-channel edge 2 -> 3, every 1-D CAM
        signal) is launch-bound rather than FLOP-bound, so ops of one dilation share one conv: each
        kernel is zero-padded (centred) to the group's largest, which leaves every output unchanged.
        """
        if dim == 2 and src.total > 4:
            return [((k,), s.kernel, s.dilation) for k, s in enumerate(self.specs)]
        groups: dict[int, list[int]] = {}
        for k, s in enumerate(self.specs):
            groups.setdefault(s.dilation, []).append(k)
        return [(tuple(ks), max(self.specs[k].kernel for k in ks), d) for d, ks in groups.items()]

    def _source(self, src: _Source, inp: torch.Tensor, weights: torch.Tensor, conv, conv_idx):
        """Every op on every edge leaving ``src``: (sum_o relu part (B, n_relu, *S), sum of sigmoid part)."""
        n_conv = len(conv_idx)
        mods = [[self.ops[e][name] for e in src.edges] for name in self.conv_names]  # [op][edge]
        bns = [m[1] for row in mods for m in row]
        # BN affine and running stats for all ops at once: (n_conv, C_tot)
        gamma = torch.cat([bn.weight for bn in bns]).view(n_conv, src.total)
        beta = torch.cat([bn.bias for bn in bns]).view(n_conv, src.total)
        # op weight of the edge owning each channel (ReLU channels only; 1 on sigmoid channels)
        w_conv = weights[:, conv_idx]  # (n_edges, n_conv)
        pieces = []
        for e, d, (lo, hi) in zip(src.edges, src.dsts, src.bounds):
            row = w_conv[e] if d != self.out else torch.ones_like(w_conv[e])
            pieces.append(row.view(n_conv, 1).expand(n_conv, hi - lo))
        scale = torch.cat(pieces, dim=1)  # (n_conv, C_tot)
        gamma, beta = gamma * scale, beta * scale
        bn0 = bns[0]
        update = self.training and bn0.track_running_stats
        training = self.training or bn0.running_mean is None
        has_stats = bn0.running_mean is not None
        if has_stats:
            run_mean = torch.cat([bn.running_mean for bn in bns]).view(n_conv, src.total)
            run_var = torch.cat([bn.running_var for bn in bns]).view(n_conv, src.total)
        if update and bn0.momentum is None:
            raise ValueError("stacked cell: BatchNorm momentum=None (cumulative average) is not supported")
        zs = []  # per conv op: BN output (B, C_tot, *S)
        groups = self._groups(src, self.dim)
        for ks, kernel, dilation in groups:
            n_g = len(ks)
            w = torch.cat([_pad_kernel(m[0].weight, kernel, self.dim) for k in ks for m in mods[k]])
            b = torch.cat([m[0].bias for k in ks for m in mods[k]])
            # (B, n_g * C_tot, *S), channel = op-in-group * C_tot + stacked edge channel
            y = conv(inp, w, b, padding=dilation * (kernel - 1) // 2, dilation=dilation)
            sel = list(ks)
            if has_stats:
                # contiguous rows (the usual case) stay views, so batch_norm's update lands in run_*
                rows = slice(ks[0], ks[-1] + 1) if sel == list(range(ks[0], ks[-1] + 1)) else None
                rm = run_mean[rows].reshape(-1) if rows else run_mean[sel].reshape(-1)
                rv = run_var[rows].reshape(-1) if rows else run_var[sel].reshape(-1)
            else:
                rm = rv = None
            z = F.batch_norm(y, rm, rv, gamma[sel].reshape(-1), beta[sel].reshape(-1), training,
                             bn0.momentum or 0.0, bn0.eps)
            if has_stats and update and not rows:
                with torch.no_grad():
                    run_mean[sel], run_var[sel] = rm.view(n_g, -1), rv.view(n_g, -1)
            zs.extend(z.split(src.total, dim=1) if n_g > 1 else (z,))
        order = [k for ks, _, _ in groups for k in ks]
        w_sig = weights[src.edges[-1], [conv_idx[k] for k in order]]  # (n_conv,) op weights of the sigmoid edge
        out = act_sum(zs, src.n_relu, w_sig)
        if update:
            with torch.no_grad():
                flat_m, flat_v = run_mean.reshape(-1), run_var.reshape(-1)
                sizes = [bn.running_mean.numel() for bn in bns]
                torch._foreach_copy_([bn.running_mean for bn in bns], list(flat_m.split(sizes)))
                torch._foreach_copy_([bn.running_var for bn in bns], list(flat_v.split(sizes)))
                torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
        return out


def _pad_kernel(w: torch.Tensor, kernel: int, dim: int) -> torch.Tensor:
    """(C_out, C_in, *k) -> (C_out, C_in, *kernel), zeros around the centre (same output, same padding)."""
    p = (kernel - w.shape[-1]) // 2
    return F.pad(w, (p, p) * dim) if p else w


def act_sum(zs: list[torch.Tensor], n_relu: int, w_sig: torch.Tensor):
    """(sum_k relu(z_k[:, :n_relu]) or None when n_relu is 0, sum_k w_sig[k] * sigmoid(z_k[:, n_relu:])).

    zs: BN outputs of one source's conv ops, each (B, C_tot, *S), whose last channel feeds the output
    node (every node has an edge into it); w_sig: (len(zs),). One autograd node for all ops: the
    backward writes each op's ReLU and sigmoid gradients straight into one (B, C_tot, *S) tensor in the
    layout of z, where per-op relu/sigmoid/split nodes would each allocate an output, and the split's
    backward would copy both parts again into a new tensor (a full pass per op).
    """
    if n_relu == 0:  # only the output edge leaves this node: 1-channel, cheap, plain autograd
        return None, sum(torch.sigmoid(z) * w.to(z.dtype) for z, w in zip(zs, w_sig))
    return _ActSum.apply(n_relu, w_sig, *zs)


class _ActSum(torch.autograd.Function):
    """See ``act_sum``. First-order only (the search is first-order DARTS): no double backward.
    Unused outputs get zero gradients (autograd's default ``materialize_grads``), never None."""

    @staticmethod
    def forward(ctx, n_relu: int, w_sig: torch.Tensor, *zs: torch.Tensor):
        relu_sum = zs[0][:, :n_relu].clamp_min(0)
        tmp = torch.empty_like(relu_sum) if len(zs) > 1 else None
        for z in zs[1:]:
            relu_sum.add_(torch.clamp_min(z[:, :n_relu], 0, out=tmp))
        w = w_sig.to(zs[0].dtype)
        sigs = [torch.sigmoid(z[:, n_relu:]) for z in zs]  # (B, 1, *S) each, kept for the backward
        sig_sum = sigs[0] * w[0]
        for k in range(1, len(zs)):
            sig_sum.addcmul_(sigs[k], w[k])
        ctx.n_relu, ctx.n_ops = n_relu, len(zs)
        ctx.save_for_backward(w_sig, *zs, *sigs)
        return relu_sum, sig_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_relu: torch.Tensor, g_sig: torch.Tensor):
        w_sig, *saved = ctx.saved_tensors
        zs, sigs = saved[:ctx.n_ops], saved[ctx.n_ops:]
        nr = ctx.n_relu
        g_w = torch.zeros_like(w_sig) if ctx.needs_input_grad[1] else None
        w = w_sig.to(zs[0].dtype)
        grads = []
        for k, (z, s) in enumerate(zip(zs, sigs)):
            gz = torch.empty_like(z)  # the layout of z (channels_last where the conv ran so)
            # relu'(z) = [z > 0], as autograd's ReLU backward (taken on its output)
            torch.ops.aten.threshold_backward.grad_input(g_relu, z[:, :nr], 0.0, grad_input=gz[:, :nr])
            # d/dz w sigmoid(z) = w s (1 - s); d/dw = s
            gs = g_sig * s
            torch.mul(gs - gs * s, w[k], out=gz[:, nr:])
            if g_w is not None:
                g_w[k] = gs.sum().to(g_w.dtype)
            grads.append(gz)
        return None, g_w, *grads
