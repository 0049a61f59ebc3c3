"""Segmentation losses on sigmoid probabilities (method.md section 5).

Every loss has the signature ``loss(p, g, ignore=None, **options) -> scalar Tensor`` with

- ``p``: probabilities ``(B, C, H, W)`` in [0, 1] (the models end in a sigmoid; C = 4 channels are the
  classes 1..4, there is no background channel),
- ``g``: multi-hot targets ``(B, C, H, W)`` (0/1, any float or integer dtype),
- ``ignore``: optional ``(B, H, W)`` bool, True where a pixel is excluded (it contributes nothing to
  any sum, mean or label frequency).

Arithmetic is float32 whatever the input dtype (bf16 under autocast included). Probabilities are
clamped to ``[eps, 1 - eps]`` (eps = 1e-7) before any logarithm, and ``x ** 0.3`` is taken of
``max(x, eps)``, so p in {0, 1} gives finite values and finite gradients (the clamp passes no gradient
where p is saturated, i.e. for sigmoid logits beyond about +-16, where the sigmoid's own derivative is
already ~1e-7). NaN inputs are not hidden: they propagate to a NaN loss, which the engine checks for.

Registry (``create_loss``): ``exp_log`` (paper protocol), ``exp_log_dice`` (code protocol),
``soft_dice``, ``bce``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

EPS = 1e-7
# method.md section 5: the release's Dice smoothing, used by both protocols
SMOOTH_NUM = 1e-7
SMOOTH_DEN = 1.0

LossFn = Callable[..., Tensor]
Weights = Union[Tensor, Sequence[float], None]


def _prepare(p: Tensor, g: Tensor, ignore: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Validate shapes; return float32 ``p``, ``g`` (B, C, H, W) and ``keep`` (B, 1, H, W) in {0, 1}."""
    if p.dim() != 4:
        raise ValueError(f"loss: predictions must be (B, C, H, W) probabilities, got {tuple(p.shape)}")
    if g.shape != p.shape:
        raise ValueError(f"loss: targets shape {tuple(g.shape)} does not match predictions {tuple(p.shape)}")
    if ignore is None:
        keep = torch.ones((p.shape[0], 1, *p.shape[2:]), dtype=torch.float32, device=p.device)
    else:
        expected = (p.shape[0], *p.shape[2:])
        if tuple(ignore.shape) != expected:
            raise ValueError(f"loss: ignore mask shape {tuple(ignore.shape)} != expected (B, H, W) "
                             f"{expected}")
        keep = (~ignore.bool()).to(torch.float32).unsqueeze(1)
    return p.float(), g.float(), keep


def _pow(x: Tensor, gamma: float) -> Tensor:
    # d/dx x**0.3 is infinite at 0: a floor keeps the gradient finite when a term is already perfect
    return x.clamp_min(EPS).pow(gamma)


def _zero_if_empty(loss: Tensor, keep: Tensor) -> Tensor:
    # a batch with every pixel ignored has nothing to learn from: 0, not a smoothing artefact
    return torch.where(keep.sum() > 0, loss, torch.zeros_like(loss))


def dice_per_class(p: Tensor, g: Tensor, ignore: Optional[Tensor] = None, *,
                   smooth_num: float = SMOOTH_NUM, smooth_den: float = SMOOTH_DEN) -> Tensor:
    """Soft Dice per class over the whole batch: ``(C,)``.

    ``D_c = (2 sum p g + smooth_num) / (sum p + sum g + smooth_den)``, sums over batch and pixels
    (the release's formula and constants). Ignored pixels are zeroed in p and g before summing.
    """
    p, g, keep = _prepare(p, g, ignore)
    dims = (0, 2, 3)
    inter = (p * g * keep).sum(dims)  # (C,)
    total = (p * keep).sum(dims) + (g * keep).sum(dims)  # (C,)
    return (2.0 * inter + smooth_num) / (total + smooth_den)


def label_frequencies(g: Tensor, ignore: Optional[Tensor] = None) -> Tensor:
    """Pixel counts per label ``(C + 1,)``: index 0 = background (no positive class), 1..C = classes.

    Counts only kept pixels. A multi-hot pixel counts once for each of its classes.
    """
    _, g, keep = _prepare(g, g, ignore)
    positive = g > 0.5  # (B, C, H, W)
    background = (~positive.any(1, keepdim=True)).float() * keep  # (B, 1, H, W)
    per_class = (positive.float() * keep).sum((0, 2, 3))  # (C,)
    return torch.cat([background.sum().reshape(1), per_class])


def wong_weights(frequencies: Union[Tensor, Sequence[float]]) -> Tensor:
    """Wong et al. 2018 label weights ``w_l = (sum_k f_k / f_l) ** 0.5`` for counts ``(C + 1,)``.

    A label that never occurs (f_l = 0) gets weight 0: no term uses it, and it must not be infinite.
    """
    f = torch.as_tensor(frequencies, dtype=torch.float32)
    if f.dim() != 1 or bool((f < 0).any()):
        raise ValueError(f"wong_weights: expected a 1-D tensor of non-negative counts, got {f.tolist()}")
    w = (f.sum() / f.clamp_min(1.0)).sqrt()
    return torch.where(f > 0, w, torch.zeros_like(w))


def soft_dice(p: Tensor, g: Tensor, ignore: Optional[Tensor] = None, *,
              smooth_num: float = SMOOTH_NUM, smooth_den: float = SMOOTH_DEN) -> Tensor:
    """``1 - mean_c D_c`` with the batch-global Dice of :func:`dice_per_class`. Scalar."""
    d = dice_per_class(p, g, ignore, smooth_num=smooth_num, smooth_den=smooth_den)
    _, _, keep = _prepare(p, g, ignore)
    return _zero_if_empty(1.0 - d.mean(), keep)


def exp_log_dice(p: Tensor, g: Tensor, ignore: Optional[Tensor] = None, *, gamma: float = 0.3,
                 smooth_num: float = SMOOTH_NUM, smooth_den: float = SMOOTH_DEN) -> Tensor:
    """The release's Dice-only exponential logarithmic loss ``mean_c (-ln D_c) ** gamma``. Scalar.

    D_c as in :func:`dice_per_class` (per class over the whole batch, smoothing 1e-7 / 1). The mean
    runs over all C classes, present in the batch or not, as in the release. With this smoothing a
    perfect prediction is not exactly 0: it gives ``(-ln((2S + 1e-7) / (2S + 1))) ** 0.3`` per class
    for S foreground pixels (about 0.026 at S = 1e5).
    """
    d = dice_per_class(p, g, ignore, smooth_num=smooth_num, smooth_den=smooth_den)
    _, _, keep = _prepare(p, g, ignore)
    return _zero_if_empty(_pow(-torch.log(d), gamma).mean(), keep)


def _pixel_weights(g: Tensor, keep: Tensor, weights: Tensor) -> Tensor:
    """Per-pixel label weight ``(B, 1, H, W)``: background pixels get weights[0], a class-c pixel
    weights[c]; a multi-hot pixel takes the largest weight among its classes (its rarest label)."""
    positive = (g > 0.5).float()  # (B, C, H, W)
    class_w = (positive * weights[1:].view(1, -1, 1, 1)).amax(1, keepdim=True)
    is_bg = 1.0 - positive.amax(1, keepdim=True)
    return (is_bg * weights[0] + class_w) * keep


def exp_log(p: Tensor, g: Tensor, ignore: Optional[Tensor] = None, *, class_weights: Weights = None,
            w_dice: float = 0.8, w_cross: float = 0.2, gamma_dice: float = 0.3, gamma_cross: float = 0.3,
            smooth_num: float = SMOOTH_NUM, smooth_den: float = SMOOTH_DEN) -> Tensor:
    """Exponential logarithmic loss of Wong et al. 2018, adapted to independent sigmoids. Scalar.

    ``w_dice * E_c[(-ln D_c) ** gamma_dice] + w_cross * E_{x,c}[w_{l(x)} (-ln p_l(x,c)) ** gamma_cross]``

    Choices (the paper names the loss but gives no formula of its own):

    - Dice term: exactly :func:`exp_log_dice` (method.md lists the release's batch-global D_c with
      smoothing 1e-7 / 1 as shared by both protocols), so ``exp_log = 0.8 * exp_log_dice + 0.2 * CE``.
    - Cross-entropy term: each (pixel, class) pair is a binary problem; ``p_l = p`` where g = 1 and
      ``1 - p`` where g = 0 (the probability given to the true label), clamped to [1e-7, 1 - 1e-7].
      E is the mean over all kept (pixel, class) terms, so the term has BCE's scale (Wong's mean over
      pixels of one softmax term, divided by C).
    - Labels and weights: the label l(x) of a pixel is background (no positive class, index 0) or its
      class (1..C). All C terms of a pixel take that pixel's weight, as Wong's one softmax term per
      pixel would: a macrophage pixel's "not epithelial" term is weighted like a macrophage, so
      confusions on rare-class pixels cost more. A multi-hot pixel takes its largest class weight.
    - ``class_weights``: ``(C + 1,)`` weights for [background, class 1, ..., class C]. Default None
      computes Wong's ``w_l = (sum_k f_k / f_l) ** 0.5`` from the label frequencies of this batch's
      kept pixels (:func:`label_frequencies`, :func:`wong_weights`); a label absent from the batch gets
      weight 0 (unused). Pass dataset-level weights for weights that do not change between batches.
    - gamma_dice = gamma_cross = 0.3 and weights 0.8 / 0.2 as in Wong et al.
    """
    pf, gf, keep = _prepare(p, g, ignore)
    n_classes = pf.shape[1]
    if class_weights is None:
        weights = wong_weights(label_frequencies(gf, ignore)).to(pf.device)
    else:
        weights = torch.as_tensor(class_weights, dtype=torch.float32, device=pf.device).flatten()
        if weights.numel() != n_classes + 1:
            raise ValueError(f"exp_log: class_weights needs {n_classes + 1} values ([background, classes "
                             f"1..{n_classes}]), got {weights.numel()}")
    dice_term = exp_log_dice(p, g, ignore, gamma=gamma_dice, smooth_num=smooth_num, smooth_den=smooth_den)

    pc = pf.clamp(EPS, 1.0 - EPS)
    p_true = gf * pc + (1.0 - gf) * (1.0 - pc)  # (B, C, H, W)
    terms = _pow(-torch.log(p_true), gamma_cross) * _pixel_weights(gf, keep, weights)
    cross_term = terms.sum() / (keep.sum() * n_classes).clamp_min(1.0)
    return _zero_if_empty(w_dice * dice_term + w_cross * cross_term, keep)


def bce(p: Tensor, g: Tensor, ignore: Optional[Tensor] = None) -> Tensor:
    """Mean binary cross-entropy over kept (pixel, class) terms, p clamped to [1e-7, 1 - 1e-7]. Scalar.

    Written out rather than ``F.binary_cross_entropy``, which refuses to run under CUDA autocast.
    """
    pf, gf, keep = _prepare(p, g, ignore)
    pc = pf.clamp(EPS, 1.0 - EPS)
    terms = -(gf * torch.log(pc) + (1.0 - gf) * torch.log(1.0 - pc)) * keep
    return terms.sum() / (keep.sum() * pf.shape[1]).clamp_min(1.0)


LOSSES: dict[str, LossFn] = {
    "exp_log": exp_log,
    "exp_log_dice": exp_log_dice,
    "soft_dice": soft_dice,
    "bce": bce,
}


def create_loss(name: str, **options) -> LossFn:
    """The loss registered as ``name`` with keyword ``options`` bound: ``fn(p, g, ignore=None)``.

    Unknown names and unknown options raise ValueError listing the valid ones.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    fn = LOSSES[name]
    valid = [n for n, prm in inspect.signature(fn).parameters.items() if prm.kind is prm.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"loss {name!r}: unknown option(s) {', '.join(unknown)}; "
                         f"valid options: {', '.join(valid) or '(none)'}")
    return functools.partial(fn, **options) if options else fn
