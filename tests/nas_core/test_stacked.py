"""The stacked supernet computes the reference function: outputs, gradients and BN statistics."""

import copy

import pytest
import torch
from torch import nn

from nas_core.config import ConfigError
from nas_core.models import create_model
from nas_core.models.perf import maybe_compile
from nas_core.search_space import CAM_OPS, SAM_OPS, Cell, StackedCell

# (table, dim, c_in, input shape) for the two cell kinds
KINDS = {"sam": (SAM_OPS, 2, 5, (2, 5, 7, 9)), "cam": (CAM_OPS, 1, 1, (3, 1, 24))}
TOL = dict(rtol=1e-4, atol=1e-5)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    # default BN init (gamma 1, beta 0, stats 0/1) would hide a permuted affine or a lost stats update
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def _pair(kind: str, zero_op: str, channels_last: bool = True):
    ops, dim, c_in, _ = KINDS[kind]
    ref = Cell(ops, c_in, dim, zero_op=zero_op)
    _randomise(ref)
    fast = StackedCell(ops, c_in, dim, zero_op=zero_op)
    fast.channels_last = channels_last
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run_cell(cell: Cell, x: torch.Tensor, alpha: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    a = alpha.clone().requires_grad_(True)
    cell.zero_grad(set_to_none=True)
    y = cell(x, torch.softmax(a, dim=-1))
    (y * grad).sum().backward()
    return y.detach(), x.grad, a.grad, {n: p.grad for n, p in cell.named_parameters()}


@pytest.mark.parametrize("zero_op", ["paper", "code"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("channels_last", [True, False])
def test_stacked_cell_matches_reference(kind, zero_op, channels_last):
    ref, fast = _pair(kind, zero_op, channels_last)
    g = torch.Generator().manual_seed(1)
    shape = KINDS[kind][3]
    n_ops = len(KINDS[kind][0])
    x = torch.randn(shape, generator=g)
    alpha = torch.randn(6, n_ops, generator=g)
    out_grad = torch.randn(shape[0], 1, *shape[2:], generator=g)
    for step in range(2):  # train mode twice: the second forward reads BN stats the first updated
        y0, gx0, ga0, gp0 = _run_cell(ref.train(), x, alpha, out_grad)
        y1, gx1, ga1, gp1 = _run_cell(fast.train(), x, alpha, out_grad)
        torch.testing.assert_close(y1, y0, **TOL)
        torch.testing.assert_close(gx1, gx0, **TOL)
        torch.testing.assert_close(ga1, ga0, **TOL)
        assert gp1.keys() == gp0.keys()
        for name in gp0:
            torch.testing.assert_close(gp1[name], gp0[name], **TOL, msg=lambda m: f"{name}: {m}")
        for (name, b0), (_, b1) in zip(ref.named_buffers(), fast.named_buffers()):
            torch.testing.assert_close(b1, b0, **TOL, msg=lambda m: f"{name}: {m}")
    y0, gx0, ga0, _ = _run_cell(ref.eval(), x, alpha, out_grad)
    y1, gx1, ga1, _ = _run_cell(fast.eval(), x, alpha, out_grad)
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    torch.testing.assert_close(ga1, ga0, **TOL)


def test_state_dicts_are_interchangeable():
    ref, fast = _pair("sam", "paper")
    assert list(ref.state_dict()) == list(fast.state_dict())
    back = Cell(SAM_OPS, 5, 2)
    back.load_state_dict(fast.state_dict())  # stacked -> reference, strict
    for (k, v0), v1 in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(v0, v1), k


def test_fixed_cell_ignores_impl():
    geno = ("conv3", "zero", "atrous5", "conv1", "zero", "conv5")
    ref = Cell(SAM_OPS, 4, 2, genotype=geno)
    _randomise(ref)
    fast = StackedCell(SAM_OPS, 4, 2, genotype=geno)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(fast(x), ref(x))


def _supernet_pair(name: str, search: str, zero_op: str):
    ref = create_model(name, supernet=search, zero_op=zero_op, impl="reference")
    _randomise(ref, seed=3)
    fast = create_model(name, supernet=search, zero_op=zero_op, impl="stacked")
    fast.load_state_dict(ref.state_dict())
    assert fast.model_spec["options"]["impl"] == "stacked"
    return ref, fast


def _supernet_step(model, x, target, freeze_weights: bool):
    torch.manual_seed(7)  # the backbone's dropout draws the same masks in both forms
    model.zero_grad(set_to_none=True)
    frozen = model.weight_parameters() if freeze_weights else model.arch_parameters()
    for p in frozen:
        p.requires_grad_(False)
    try:
        probs = model(x)
        loss = ((probs - target) ** 2).mean()
        loss.backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return probs.detach(), grads


@pytest.mark.parametrize("zero_op", ["paper", "code"])
@pytest.mark.parametrize("search", ["synchronous", "shared"])
@pytest.mark.parametrize("name", ["nas-scam-p", "nas-scam-s"])
def test_stacked_supernet_matches_reference(name, search, zero_op):
    ref, fast = _supernet_pair(name, search, zero_op)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=g)  # the smallest size the 4-level U-Net takes
    target = torch.rand(2, 4, 16, 16, generator=g)
    # a w step (alpha frozen), then an alpha step (weights frozen), as in the paper's search iteration
    for freeze_weights in (False, True):
        p0, g0 = _supernet_step(ref.train(), x, target, freeze_weights)
        p1, g1 = _supernet_step(fast.train(), x, target, freeze_weights)
        torch.testing.assert_close(p1, p0, **TOL)
        assert g1.keys() == g0.keys() and g0
        if freeze_weights:
            assert set(g0) == {"alpha_sam", "alpha_cam"}
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # BN statistics deep in the net after two steps carry float32 rounding (exact in float64: below)
    for (k, b0), b1 in zip(ref.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(b1, b0, rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), ref.eval()(x), **TOL)


def test_output_sigmoid_is_float32_under_bf16_autocast():
    model = create_model("unet")
    x = torch.randn(1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = model(x)
    assert probs.dtype == torch.float32
    # a logit of 8 is 0.99966 in float32 but exactly 1.0 in bf16: the float32 head keeps it below 1
    assert torch.sigmoid(torch.tensor(8.0, dtype=torch.bfloat16)).item() == 1.0
    assert torch.sigmoid(torch.tensor(8.0, dtype=torch.bfloat16).float()).item() < 1.0


def test_maybe_compile_disabled_returns_the_model():
    model = create_model("unet")
    assert maybe_compile(model, enabled=False) is model
    with pytest.raises(ValueError, match="mode"):
        maybe_compile(model, enabled=True, mode="fastest")


def test_compile_setting_is_checked_and_off_by_default():
    from nas_core.config import load_config

    assert load_config().compile == "off"
    assert load_config(overrides=["compile=reduce-overhead"]).compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile: 'fast' is not one of"):
        load_config(overrides=["compile=fast"])


@pytest.mark.slow
def test_prepare_model_compiles_when_asked_and_computes_the_same_function(tmp_path):
    """cfg.compile reaches torch.compile through the engine's prepare_model (a tiny net: compiling a
    whole supernet takes many minutes on a CPU); forward, gradients and state_dict keys are unchanged."""
    from pathlib import Path

    from nas_core.config import load_config
    from nas_core.engine.loop import RunContext, prepare_model

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    twin = copy.deepcopy(eager)
    ctx = RunContext(cfg=load_config(overrides=["compile=default"]), out_dir=Path(tmp_path),
                     device=torch.device("cpu"), data=None, loss_fn=None)
    compiled = prepare_model(twin, ctx)
    assert compiled is twin and twin._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 3, 8, 8)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
    off = prepare_model(copy.deepcopy(eager), RunContext(cfg=load_config(), out_dir=Path(tmp_path),
                                                          device=torch.device("cpu"), data=None, loss_fn=None))
    assert off._compiled_call_impl is None


@pytest.mark.parametrize("name", ["nas-scam-p", "nas-scam-s"])
def test_stacked_supernet_is_exact_in_float64(name):
    """In float64 the two forms agree to rounding (1e-10): the float32 tolerances above hide no real
    difference in outputs, gradients (w and alpha steps) or BN statistics."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, fast = _supernet_pair(name, "synchronous", "paper")
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, 3, 16, 16, generator=g)
        target = torch.rand(2, 4, 16, 16, generator=g)
        for freeze_weights in (False, True):
            p0, g0 = _supernet_step(ref.train(), x, target, freeze_weights)
            p1, g1 = _supernet_step(fast.train(), x, target, freeze_weights)
            torch.testing.assert_close(p1, p0, rtol=1e-10, atol=1e-12)
            for k in g0:
                torch.testing.assert_close(g1[k], g0[k], rtol=1e-8, atol=1e-12, msg=lambda m: f"{k}: {m}")
        for (k, b0), b1 in zip(ref.state_dict().items(), fast.state_dict().values()):
            torch.testing.assert_close(b1, b0, rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    finally:
        torch.set_default_dtype(default)


@pytest.fixture()
def pinned_torch_state():
    """What a CPU bf16 result depends on beyond its inputs, set here and restored after, so that no
    earlier test (or test order) can change it: intra-op threads (oneDNN's reduction split), the
    default dtype, deterministic-algorithm mode, the global RNG and autocast's cast cache."""
    saved = (torch.get_num_threads(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
             torch.get_rng_state())
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(False)
    torch.clear_autocast_cache()
    yield
    threads, dtype, deterministic, rng = saved
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(rng)


def test_stacked_supernet_trains_under_bf16_autocast(pinned_torch_state):
    """The GPU path's dtype handling, on CPU: under bf16 autocast the stacked cell's convs run in bf16,
    its activation sums and gradients keep working, and it stays close to the per-op cell there too.

    Every input is seeded here (weights and BN statistics by _randomise, data by a generator, dropout
    by _supernet_step) and the global state it reads is pinned by the fixture; each step runs twice
    and must repeat bit for bit, so a result that depended on anything else (uninitialised memory,
    a racy kernel) fails as such instead of as a non-finite gradient now and then."""
    ref, fast = _supernet_pair("nas-scam-p", "synchronous", "paper")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    target = torch.rand(2, 4, 16, 16, generator=g)
    outs = []
    for label, model in (("reference", ref), ("stacked", fast)):
        for freeze_weights in (False, True):
            state = copy.deepcopy(model.state_dict())  # a train-mode step updates the BN statistics
            runs = []
            for _ in range(2):
                model.load_state_dict(state)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    runs.append(_supernet_step(model.train(), x, target, freeze_weights))
            (probs, grads), (probs2, grads2) = runs
            assert probs.dtype == torch.float32
            bad = sorted(k for k, v in grads.items() if not torch.isfinite(v).all())
            assert grads and not bad, f"{label}, freeze_weights={freeze_weights}: non-finite gradients {bad[:5]}"
            assert torch.equal(probs, probs2) and all(torch.equal(grads[k], grads2[k]) for k in grads), \
                f"{label}, freeze_weights={freeze_weights}: the same bf16 step gave different results"
            if freeze_weights:
                assert grads["alpha_sam"].abs().sum() > 0 and grads["alpha_cam"].abs().sum() > 0
        outs.append(probs)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=3e-2)
