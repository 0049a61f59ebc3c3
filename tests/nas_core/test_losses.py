import math

import pytest
import torch

from nas_core.losses import LOSSES, create_loss, dice_per_class, label_frequencies, wong_weights

# a 1x4x2x2 case; pixels in row-major order: (0,0) class 1, (0,1) class 2, (1,0) class 1, (1,1) background
G_PIX = [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # [pixel][class]
P_PIX = [[0.9, 0.2, 0.1, 0.05], [0.3, 0.6, 0.05, 0.2], [0.4, 0.1, 0.7, 0.1], [0.1, 0.05, 0.2, 0.95]]


def to_tensor(pix):  # [pixel][class] -> (1, 4, 2, 2)
    return torch.tensor(pix, dtype=torch.float32).T.reshape(1, 4, 2, 2)


def ref_dice(p_pix, g_pix, keep=None):
    keep = keep or [1] * len(p_pix)
    out = []
    for c in range(4):
        inter = sum(k * p[c] * g[c] for p, g, k in zip(p_pix, g_pix, keep))
        total = sum(k * (p[c] + g[c]) for p, g, k in zip(p_pix, g_pix, keep))
        out.append((2 * inter + 1e-7) / (total + 1))
    return out


def ref_exp_log_dice(p_pix, g_pix, keep=None):
    return sum((-math.log(d)) ** 0.3 for d in ref_dice(p_pix, g_pix, keep)) / 4


def ref_cross(p_pix, g_pix):
    # Wong weights from this batch: bg 1 px, class 1 2 px, class 2 1 px, classes 3-4 absent
    w = {"bg": math.sqrt(4 / 1), 1: math.sqrt(4 / 2), 2: math.sqrt(4 / 1)}
    total = 0.0
    for p, g in zip(p_pix, g_pix):
        label = g.index(1) + 1 if 1 in g else "bg"
        for c in range(4):
            p_true = min(max(p[c], 1e-7), 1 - 1e-7) if g[c] else 1 - min(max(p[c], 1e-7), 1 - 1e-7)
            total += w[label] * max(-math.log(p_true), 1e-7) ** 0.3
    return total / 16


def test_dice_and_exp_log_dice_hand_computed():
    p, g = to_tensor(P_PIX), to_tensor(G_PIX)
    # class 1 by hand: inter 0.9 + 0.4, sums 1.7 + 2
    assert dice_per_class(p, g)[0].item() == pytest.approx((2 * 1.3 + 1e-7) / (1.7 + 2 + 1), rel=1e-6)
    assert dice_per_class(p, g).tolist() == pytest.approx(ref_dice(P_PIX, G_PIX), rel=1e-6)
    assert create_loss("exp_log_dice")(p, g).item() == pytest.approx(ref_exp_log_dice(P_PIX, G_PIX), rel=1e-6)
    soft = 1 - sum(ref_dice(P_PIX, G_PIX)) / 4
    assert create_loss("soft_dice")(p, g).item() == pytest.approx(soft, rel=1e-6)


def test_constant_half_literal_values():
    g = to_tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    p = torch.full_like(g, 0.5)
    # every class: D = (2 * 0.5 + 1e-7) / (2 + 1 + 1) = 0.25
    assert create_loss("soft_dice")(p, g).item() == pytest.approx(0.75, rel=1e-6)
    assert create_loss("exp_log_dice")(p, g).item() == pytest.approx(math.log(4) ** 0.3, rel=1e-6)
    assert create_loss("bce")(p, g).item() == pytest.approx(math.log(2), rel=1e-6)


def test_exp_log_hand_computed():
    p, g = to_tensor(P_PIX), to_tensor(G_PIX)
    assert wong_weights(label_frequencies(g)).tolist() == pytest.approx([2, math.sqrt(2), 2, 0, 0])
    expected = 0.8 * ref_exp_log_dice(P_PIX, G_PIX) + 0.2 * ref_cross(P_PIX, G_PIX)
    assert create_loss("exp_log")(p, g).item() == pytest.approx(expected, rel=1e-6)


def test_exp_log_with_unit_weights_and_gamma_one_is_bce():
    p, g = to_tensor(P_PIX), to_tensor(G_PIX)
    cross_only = create_loss("exp_log", w_dice=0.0, w_cross=1.0, gamma_cross=1.0, class_weights=[1.0] * 5)
    assert cross_only(p, g).item() == pytest.approx(create_loss("bce")(p, g).item(), rel=1e-6)


def test_exp_log_explicit_weights_scale_cross_term():
    p, g = to_tensor(P_PIX), to_tensor(G_PIX)
    one = create_loss("exp_log", w_dice=0.0, class_weights=[1.0] * 5)(p, g)
    three = create_loss("exp_log", w_dice=0.0, class_weights=[3.0] * 5)(p, g)
    assert three.item() == pytest.approx(3 * one.item(), rel=1e-6)
    with pytest.raises(ValueError, match="class_weights needs 5 values"):
        create_loss("exp_log", class_weights=[1.0] * 4)(p, g)


def test_perfect_prediction_only_smoothing_left():
    g = torch.zeros(2, 4, 32, 32)
    for c in range(4):
        g[:, c, c * 8:(c + 1) * 8, :] = 1  # 2 * 8 * 32 = 512 pixels per class
    loss = create_loss("exp_log_dice")(g.clone(), g).item()
    smoothing_only = (-math.log((2 * 512 + 1e-7) / (2 * 512 + 1))) ** 0.3
    assert loss == pytest.approx(smoothing_only, rel=1e-4)
    assert loss < 0.13 < create_loss("exp_log_dice")(0.9 * g, g).item()
    assert create_loss("soft_dice")(g.clone(), g).item() == pytest.approx(1 / 1025, rel=1e-3)
    assert create_loss("bce")(g.clone(), g).item() < 1e-6
    # exp_log adds its cross-entropy term: weight 2 for every class here, each term at the 1e-7 clamp
    exp_log = create_loss("exp_log")(g.clone(), g).item()
    assert 0.8 * loss < exp_log < 0.8 * loss + 0.2 * 2 * 0.01


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_finite_at_saturated_probabilities(name):
    g = to_tensor(G_PIX)
    for p0 in (g.clone(), 1 - g, torch.zeros_like(g), torch.ones_like(g)):
        p = p0.clone().requires_grad_()
        loss = create_loss(name)(p, g)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(p.grad).all(), (name, p0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_direction(name):
    g, p = to_tensor(G_PIX), torch.full((1, 4, 2, 2), 0.5, requires_grad=True)
    create_loss(name)(p, g).backward()
    assert (p.grad[g == 1] < 0).all() and (p.grad[g == 0] > 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_contribute_nothing(name):
    torch.manual_seed(0)
    p = torch.rand(2, 4, 3, 5, requires_grad=True)
    g = (torch.rand(2, 4, 3, 5) > 0.6).float()
    ignore = torch.zeros(2, 3, 5, dtype=torch.bool)
    ignore[:, :, 3:] = True
    loss_fn = create_loss(name)
    masked = loss_fn(p, g, ignore)
    cropped = loss_fn(p[..., :3], g[..., :3])
    assert masked.item() == pytest.approx(cropped.item(), rel=1e-6)
    masked.backward()
    assert (p.grad[..., 3:] == 0).all() and (p.grad[..., :3] != 0).any()
    # anything in the ignored pixels, even garbage targets, leaves the loss unchanged
    g2 = g.clone()
    g2[..., 3:] = 1 - g2[..., 3:]
    assert loss_fn(p, g2, ignore).item() == pytest.approx(masked.item(), rel=1e-6)


def test_ignore_mask_hand_computed():
    p, g = to_tensor(P_PIX), to_tensor(G_PIX)
    ignore = torch.tensor([[[False, False], [True, False]]])  # drops pixel (1,0), a class-1 pixel
    keep = [1, 1, 0, 1]
    assert create_loss("exp_log_dice")(p, g, ignore).item() == pytest.approx(
        ref_exp_log_dice(P_PIX, G_PIX, keep), rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_everything_ignored_gives_zero(name):
    p = torch.rand(1, 4, 2, 2, requires_grad=True)
    loss = create_loss(name)(p, torch.ones(1, 4, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_inputs_computed_in_float32(name):
    p, g = to_tensor(P_PIX), to_tensor(G_PIX)
    p16 = p.bfloat16()
    loss = create_loss(name)(p16, g.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(create_loss(name)(p16.float(), g).item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_nan_is_not_hidden(name):
    p = to_tensor(P_PIX)
    p[0, 1, 0, 0] = float("nan")
    assert torch.isnan(create_loss(name)(p, to_tensor(G_PIX)))


def test_create_loss_errors():
    with pytest.raises(ValueError, match="unknown loss 'dice'.*bce, exp_log, exp_log_dice, soft_dice"):
        create_loss("dice")
    with pytest.raises(ValueError, match="unknown option.*gama.*valid options: gamma"):
        create_loss("exp_log_dice", gama=0.5)
    with pytest.raises(ValueError, match="unknown option.*class_weights"):
        create_loss("bce", class_weights=[1] * 5)


def test_create_loss_binds_options():
    p, g = to_tensor(P_PIX), to_tensor(G_PIX)
    gamma1 = create_loss("exp_log_dice", gamma=1.0)(p, g).item()
    assert gamma1 == pytest.approx(sum(-math.log(d) for d in ref_dice(P_PIX, G_PIX)) / 4, rel=1e-6)


def test_shape_errors_name_the_shapes():
    p = torch.rand(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"targets shape \(1, 3, 2, 2\)"):
        create_loss("bce")(p, torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"ignore mask shape \(2, 2\)"):
        create_loss("bce")(p, torch.zeros_like(p), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        create_loss("soft_dice")(p[0], torch.zeros_like(p[0]))
