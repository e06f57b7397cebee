"""The Triton backend (torch.ops.dabnet_triton) against the pure-PyTorch reference.

Without a GPU these run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: shapes are small and each case launches few kernels. With a
GPU the same tests run on CUDA tensors, plus bfloat16.
"""
import types

import pytest
import torch

from dabnet_kernels import backend, ops, reference
from helpers import bn_params, clone_params, dw_weight, make_input, tol

if not backend.triton_available():  # pragma: no cover - depends on the installation
    pytest.skip("triton is not installed", allow_module_level=True)

import dabnet_kernels.triton as T  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"  # CPU tensors: the interpreter
LAYOUTS = ("nchw", "channels_last")
TT = torch.ops.dabnet_triton


@pytest.fixture(autouse=True)
def _triton_backend():
    with backend.use_backend("triton"):
        yield


def _tol(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=4e-3, atol=4e-3)
    return tol(dtype)


def _dtypes():
    """float16 runs under the interpreter; bfloat16 only compiled (the interpreter lacks it)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


def _grads_close(a, b, dtype, scale=1.0):
    t = _tol(dtype)
    torch.testing.assert_close(a, b, rtol=t["rtol"] * scale, atol=t["atol"] * scale)


def _pair(x):
    """x and an independent copy (both leaves requiring grad), for ours-vs-reference runs."""
    return x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()


def test_backend_routes_to_triton():
    x = make_input((1, 2, 3, 4), dtype=torch.float32, device=DEVICE)
    assert backend.resolve(x) == "triton"
    assert backend.ops_for(x) is TT
    assert T.AVAILABLE


# ------------------------------------------------------------------------------------- dwconv3
# W = 18 > 16 >= H = 13: dilation 16 reaches inside the image along W only; 40 passes both sides.
@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", [1, 2, 3, 4, 5, 8, 16, 40])
def test_dwconv3_forward(dilation, layout, along):
    x = make_input((2, 3, 13, 18), layout, torch.float32, DEVICE)
    w = dw_weight(3, along, torch.float32, DEVICE)
    out = ops.dwconv3(x, w, dilation)
    torch.testing.assert_close(out, reference.dwconv3(x, w, dilation), **tol(torch.float32))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("shape", [(1, 2, 37, 45), (1, 1, 3, 1500)])
@pytest.mark.parametrize("along", ["h", "w"])
def test_nchw_row_tiles(along, shape):
    """NCHW tiles of one channel are rows x columns (tile_coords' BW > 0): a partial last row
    block and a W narrower than the tile (37x45), and a W wider than one column block (1500)."""
    from dabnet_kernels.triton import _common as cm

    meta = dict(C=shape[1], H=shape[2], W=shape[3], CL=False, BLOCK=cm.CONFIGS[0].kwargs["BLOCK"])
    bc, bp, bw = cm._tile(meta)
    assert bc == 1 and bw > 0 and (shape[2] % (bp // bw) or shape[3] > bw)
    x = make_input(shape, "nchw", torch.float32, DEVICE)
    w = dw_weight(shape[1], along, torch.float32, DEVICE)
    for dilation in (1, 2, 5):
        torch.testing.assert_close(ops.dwconv3(x, w, dilation),
                                   reference.dwconv3(x, w, dilation), **tol(torch.float32))
    weights, bns = _neck_params(shape[1], torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ops.dab_neck(x, weights, bns, 3),
                                   reference.dab_neck(x, weights, bns, 3), rtol=1e-4, atol=1e-5)


def _autotune_cases():
    """(kernel name, config index) for every config of the autotuned kernels."""
    from dabnet_kernels.triton import _common as cm, dab_neck as dn

    return [(name, k) for name, configs in (("tap3", cm.CONFIGS), ("grad_x", cm.CONFIGS),
                                            ("dab_neck", dn.CONFIGS))
            for k in range(len(configs))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,k", _autotune_cases())
def test_every_autotune_config_computes_the_op(name, k, layout, monkeypatch):
    """The interpreter cannot autotune, so the other tests run each kernel's first config only; on
    a GPU the autotuner may pick any. Here each config alone is in force (a one-config autotuner
    runs it without timing) and the op that launches the kernel is checked against the reference,
    at C under and over one channel tile (BC <= 64)."""
    from dabnet_kernels.triton import _common as cm, bn_prelu as bn, dab_neck as dn

    kernel, configs = {"tap3": (cm.tap3_kernel, cm.CONFIGS),
                       "grad_x": (bn._grad_x_kernel, cm.CONFIGS),
                       "dab_neck": (dn._dab_neck_kernel, dn.CONFIGS)}[name]
    monkeypatch.setattr(kernel, "configs", [configs[k]])
    for shape in ((2, 5, 7, 9), (1, 70, 3, 21)):
        C = shape[1]
        x = make_input(shape, layout, torch.float32, DEVICE)
        if name == "tap3":
            for along in "hw":
                w = dw_weight(C, along, torch.float32, DEVICE)
                torch.testing.assert_close(ops.dwconv3(x, w, 2), reference.dwconv3(x, w, 2),
                                           **tol(torch.float32))
        elif name == "grad_x":  # the eval backward's grad_input
            p = bn_params(C, torch.float32, DEVICE)
            x, xr = _pair(x)
            g = torch.randn(shape, device=DEVICE)
            ops.bn_prelu(x, *p[:5], False).backward(g)
            reference.bn_prelu(xr, *clone_params(p)[:5], False).backward(g)
            torch.testing.assert_close(x.grad, xr.grad, **tol(torch.float32))
        else:
            weights, bns = _neck_params(C, torch.float32)
            with torch.no_grad():
                torch.testing.assert_close(ops.dab_neck(x, weights, bns, 3),
                                           reference.dab_neck(x, weights, bns, 3),
                                           rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", LAYOUTS + ("strided",))
@pytest.mark.parametrize("dilation", [1, 6, 16])
def test_dwconv3_backward(dilation, layout, along):
    x, xr = _pair(make_input((2, 5, 9, 17), layout, torch.float32, DEVICE))
    w, wr = _pair(dw_weight(5, along, torch.float32, DEVICE))
    g = torch.randn(2, 5, 9, 17, device=DEVICE)
    ops.dwconv3(x, w, dilation).backward(g)
    reference.dwconv3(xr, wr, dilation).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **tol(torch.float32))
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-4)


def test_dwconv3_backward_output_mask():
    x = make_input((1, 3, 5, 6), device=DEVICE, dtype=torch.float32)
    w = dw_weight(3, "h", torch.float32, DEVICE)
    g = torch.randn_like(x)
    gx, gw = TT.dwconv3_backward(g, x, w, 2, [True, False])
    assert gw is None and gx.shape == x.shape
    gx, gw = TT.dwconv3_backward(g, x, w, 2, [False, True])
    assert gx is None and gw.shape == w.shape


# ------------------------------------------------------------------------------------ bn_prelu
@pytest.mark.parametrize("single_slope", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_prelu_forward_backward(layout, training, single_slope):
    shape = (3, 5, 7, 9)
    x, xr = _pair(make_input(shape, layout, torch.float32, DEVICE))
    p = bn_params(5, torch.float32, DEVICE, single_slope=single_slope)
    q = clone_params(p)
    leaves = [t.requires_grad_() for t in (p.weight, p.bias, p.prelu_weight)]
    leaves_r = [t.requires_grad_() for t in (q.weight, q.bias, q.prelu_weight)]
    g = torch.randn(shape, device=DEVICE)
    ops.bn_prelu(x, *p[:5], training).backward(g)
    reference.bn_prelu(xr, *q[:5], training).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **tol(torch.float32))
    for a, b in zip(leaves, leaves_r):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    # training updated the running statistics in place, exactly as the reference did
    torch.testing.assert_close(p.running_mean, q.running_mean, **tol(torch.float32))
    torch.testing.assert_close(p.running_var, q.running_var, **tol(torch.float32))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_prelu_batch_stats_are_accurate_and_deterministic(layout, aligned):
    """A large common offset: E[x^2] - E[x]^2 in float32 would lose the variance; per-lane sums
    shifted by the split's first value, merged with Chan's combination, keep it. The shapes need
    several reduction splits; one has tiles that cross images (per-element image index), the other
    whole tiles inside one image (flat_coords' ALIGNED path)."""
    from dabnet_kernels.triton import _common as cm

    N, C, H, W = (2, 4, 64, 64) if aligned else (2, 4, 40, 41)
    x64 = torch.randn(N, C, H, W, dtype=torch.float64, device=DEVICE) * 0.5 + 1000.0
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bc, bp, chunk, splits = cm.reduce_split(x, layout == "channels_last")
    assert splits > 1 and cm.reduce_aligned(x, bp, chunk) == aligned
    p = bn_params(C, torch.float32, DEVICE)
    _, mean, var = TT.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, True, 1e-3)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mean64, rtol=0, atol=1e-4)
    torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=0)
    again = TT.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, True, 1e-3)
    assert torch.equal(mean, again[1]) and torch.equal(var, again[2])


@pytest.mark.parametrize("stats", [False, True])
def test_finish_combines_many_splits(stats):
    """finish_kernel over more splits than one step of its tile (several loop steps), partials
    with unequal counts and far-apart means: the float64 combination of the reference."""
    from dabnet_kernels.triton import _common as cm

    S, C = 2500, 3
    part = torch.rand(S, 3, C, dtype=torch.float64, device=DEVICE)
    part[:, 0] = part[:, 0] * 100 - 50  # split means
    part[:, 2] = torch.randint(1, 9, (S, C), device=DEVICE).double()  # split counts
    got = cm.combine(part.float(), stats)
    p = part.float().double()
    if stats:
        m, m2, n = p[:, 0], p[:, 1], p[:, 2]
        mean = (n * m).sum(0) / n.sum(0)
        want = torch.stack([mean, (m2 + n * (m - mean) ** 2).sum(0) / n.sum(0)])
    else:
        want = p.sum(0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv3_bn_prelu_batch_stats_on_whole_tiles(layout, along):
    """The statistics of the conv output computed inside the reduction (three taps at the tile's
    pixels), on a shape whose tiles are whole and inside one image (the ALIGNED path)."""
    from dabnet_kernels.triton import _common as cm

    x = make_input((2, 3, 32, 64), layout, torch.float32, DEVICE)
    cl = layout == "channels_last"
    bc, bp, chunk, _ = cm.reduce_split(x, cl)
    assert cm.reduce_aligned(x, bp, chunk)
    w = dw_weight(3, along, torch.float32, DEVICE)
    p = bn_params(3, torch.float32, DEVICE)
    _, mean, var = TT.dwconv3_bn_prelu(x, w, 3, p.weight, p.bias, None, None, p.prelu_weight,
                                       True, 1e-3)
    pad = (3, 0) if along == "h" else (0, 3)
    y = torch.nn.functional.conv2d(x.double(), w.double(), padding=pad, dilation=3, groups=3)
    var64, mean64 = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reductions_are_deterministic(layout):
    """grad_weight and the BN backward sums: per-split partials summed in order, no atomics."""
    x = make_input((2, 6, 20, 37), layout, torch.float32, DEVICE)  # several splits
    w = dw_weight(6, "w", torch.float32, DEVICE)
    g = torch.randn_like(x)
    p = bn_params(6, torch.float32, DEVICE)
    first = TT.dwconv3_backward(g, x, w, 3, [False, True])[1]
    assert torch.equal(first, TT.dwconv3_backward(g, x, w, 3, [False, True])[1])
    args = (g, x, p.weight, p.bias, p.prelu_weight, p.running_mean, p.running_var, True, 1e-3,
            [True, True, True, True])
    a, b = TT.bn_prelu_backward(*args), TT.bn_prelu_backward(*args)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


# ---------------------------------------------------------------------------- dwconv3_bn_prelu
@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", [2, 20])
def test_dwconv3_bn_prelu_forward_backward(dilation, layout, training, along):
    shape = (2, 4, 11, 13)
    x, xr = _pair(make_input(shape, layout, torch.float32, DEVICE))
    w, wr = _pair(dw_weight(4, along, torch.float32, DEVICE))
    p = bn_params(4, torch.float32, DEVICE)
    q = clone_params(p)
    g = torch.randn(shape, device=DEVICE)
    out = ops.dwconv3_bn_prelu(x, w, dilation, *p[:5], training)
    ref = reference.dwconv3_bn_prelu(xr, wr, dilation, *q[:5], training)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p.running_var, q.running_var, **tol(torch.float32))


# ------------------------------------------------------------------------------------ dab_neck
def _neck_params(C, dtype, single_slope=False):
    weights = [dw_weight(C, a, dtype, DEVICE) for a in "hwhw"]
    return weights, [bn_params(C, dtype, DEVICE, single_slope=single_slope) for _ in range(5)]


# H = 17 > 16 >= W = 10: dilation 16 reaches inside along H only; 40 passes the whole image.
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", [1, 2, 3, 4, 6, 8, 16, 40])
def test_dab_neck_eval_one_kernel(dilation, layout):
    x = make_input((2, 3, 17, 10), layout, torch.float32, DEVICE)
    weights, bns = _neck_params(3, torch.float32, single_slope=dilation == 2)
    with torch.no_grad():
        out = ops.dab_neck(x, weights, bns, dilation)
        ref = reference.dab_neck(x, weights, bns, dilation)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_dab_neck_border_uses_zero_padding_of_first_conv_output():
    """With a large PReLU-ed bias on the first convs, act(bias) != 0: a kernel that padded the
    1x3 conv's input with act(bias) instead of zero would differ at the left/right columns."""
    x = make_input((1, 2, 5, 7), "nchw", torch.float32, DEVICE)
    weights, bns = _neck_params(2, torch.float32)
    bns = [b._replace(bias=b.bias + 3.0) for b in bns]
    with torch.no_grad():
        out = ops.dab_neck(x, weights, bns, 2)
        ref = reference.dab_neck(x, weights, bns, 2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_dab_neck_training_composes_the_triton_ops():
    x, xr = _pair(make_input((2, 3, 6, 7), "channels_last", torch.float32, DEVICE))
    weights, bns = _neck_params(3, torch.float32)
    bns_r = [clone_params(b) for b in bns]
    out = ops.dab_neck(x, weights, bns, 3, training=True)
    ref = reference.dab_neck(xr, weights, bns_r, 3, training=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_against_float32_reference(layout, dtype):
    """Inputs in dtype, float32 accumulation: compared with the reference on the same values
    upcast to float32."""
    C, shape = 4, (2, 4, 9, 10)
    x = make_input(shape, layout, torch.float32, DEVICE).to(dtype)
    xf = x.float()
    w = dw_weight(C, "h", torch.float32, DEVICE).to(dtype)
    wf = w.float()
    p = bn_params(C, torch.float32, DEVICE)  # float32 BN parameters with a half input
    weights, bns = _neck_params(C, torch.float32)
    weights = [t.to(dtype) for t in weights]
    with torch.no_grad():
        got = {
            "dwconv3": ops.dwconv3(x, w, 3),
            "bn_prelu": ops.bn_prelu(x, *clone_params(p)[:5], True),
            "dwconv3_bn_prelu": ops.dwconv3_bn_prelu(x, w, 2, *clone_params(p)[:5], False),
            "dab_neck": ops.dab_neck(x, weights, bns, 2),
        }
        want = {
            "dwconv3": reference.dwconv3(xf, wf, 3),
            "bn_prelu": reference.bn_prelu(xf, *clone_params(p)[:5], True),
            "dwconv3_bn_prelu": reference.dwconv3_bn_prelu(xf, wf, 2, *clone_params(p)[:5], False),
            "dab_neck": reference.dab_neck(xf, [t.float() for t in weights], bns, 2),
        }
    for name in got:
        assert got[name].dtype == dtype, name
        _grads_close(got[name].float(), want[name], dtype, scale=2.0)
    # backward in dtype
    xg, xr = _pair(x)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    ops.dwconv3_bn_prelu(xg, w, 2, *clone_params(p)[:5], True).backward(g)
    reference.dwconv3_bn_prelu(xr.float(), wf, 2, *clone_params(p)[:5], True).backward(g.float())
    assert xg.grad.dtype == dtype
    _grads_close(xg.grad.float(), xr.grad.float(), dtype, scale=4.0)


def test_gradcheck_float64():
    x = make_input((1, 2, 4, 5), "channels_last", torch.float64, DEVICE, requires_grad=True)
    w = dw_weight(2, "w", torch.float64, DEVICE).requires_grad_()
    p = bn_params(2, torch.float64, DEVICE)
    bw, bb, a = (t.clone().requires_grad_() for t in (p.weight, p.bias, p.prelu_weight))

    def f(x, w, bw, bb, a):
        return ops.dwconv3_bn_prelu(x, w, 2, bw, bb, None, None, a, True)

    assert torch.autograd.gradcheck(f, (x, w, bw, bb, a), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w: ops.dwconv3(x, w, 1), (x, w), fast_mode=True)


# ----------------------------------------------------------------------- opcheck and compile
def _opcheck_samples():
    x = make_input((2, 3, 5, 6), "channels_last", torch.float32, DEVICE, requires_grad=True)
    w = dw_weight(3, "h", torch.float32, DEVICE).requires_grad_()
    p = bn_params(3, torch.float32, DEVICE)
    bw, bb, a = (t.clone().requires_grad_() for t in (p.weight, p.bias, p.prelu_weight))
    g = torch.randn(2, 3, 5, 6, device=DEVICE)
    v = lambda: torch.randn(4, 3, device=DEVICE)  # noqa: E731
    c = lambda: torch.rand(3, device=DEVICE)  # noqa: E731
    return {
        "dwconv3": (x, w, 2),
        "dwconv3_backward": (g, x.detach(), w.detach(), 2, [True, True]),
        "bn_prelu_train": (x, bw, bb, None, None, a, True, 1e-3),
        "bn_prelu_eval": (x, bw, bb, p.running_mean, p.running_var, a, False, 1e-3),
        "bn_prelu_backward": (g, x.detach(), p.weight, p.bias, p.prelu_weight, p.running_mean,
                              p.running_var, True, 1e-3, [True, True, True, True]),
        "dwconv3_bn_prelu": (x, w, 3, bw, bb, None, None, a, True, 1e-3),
        "dab_neck": (x.detach(), torch.randn(4, 3, 3, device=DEVICE), v(), v(), c(), c(), c(), 2),
    }


@pytest.mark.parametrize("name", list(_opcheck_samples()))
def test_opcheck(name):
    torch.manual_seed(0)
    args = _opcheck_samples()[name]
    op = getattr(TT, name.replace("_train", "").replace("_eval", ""))
    torch.library.opcheck(op, args)


def test_compile_fullgraph_training_step():
    torch._dynamo.reset()
    C = 3
    w = dw_weight(C, "w", torch.float32, DEVICE).requires_grad_()
    p = bn_params(C, torch.float32, DEVICE, nbt=True)

    def f(x, w, rm, rv, nbt):
        y = ops.dwconv3_bn_prelu(x, w, 2, p.weight, p.bias, rm, rv, p.prelu_weight, True, 0.1,
                                 1e-3, nbt)
        return ops.bn_prelu(ops.dwconv3(y, w, 1), p.weight, p.bias, None, None, p.prelu_weight,
                            True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, x2 = _pair(make_input((2, C, 6, 7), "channels_last", torch.float32, DEVICE))
    w2 = w.detach().clone().requires_grad_()
    s1 = [p.running_mean.clone(), p.running_var.clone(),
          torch.zeros((), dtype=torch.long, device=DEVICE)]
    s2 = [t.clone() for t in s1]
    out = compiled(x, w, *s1)
    with backend.use_backend("reference"):
        ref = f(x2, w2, *s2)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_inductor_eval_neck():
    torch._dynamo.reset()
    C = 3
    weights, bns = _neck_params(C, torch.float32)
    f = torch.compile(lambda x: ops.dab_neck(x, weights, bns, 2) * 2, fullgraph=True)
    x = make_input((1, C, 8, 9), "nchw", torch.float32, DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(f(x), 2 * reference.dab_neck(x, weights, bns, 2),
                                   rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x = make_input((1, 3, 4, 5), dtype=torch.float32, device=DEVICE)
    w = dw_weight(3, "h", torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        TT.dwconv3(x, w[:2], 1)
    with pytest.raises(RuntimeError, match="dilation must be >= 1"):
        TT.dwconv3(x, w, 0)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        TT.dwconv3(x, w.double(), 1)
    with pytest.raises(RuntimeError, match="4-D"):
        TT.dwconv3(x[0], w, 1)
    p = bn_params(3, torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="eval mode needs running_mean"):
        TT.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, False, 1e-3)
    with pytest.raises(RuntimeError, match="prelu_weight must have shape"):
        TT.bn_prelu(x, p.weight, p.bias, None, None, p.weight[:2], True, 1e-3)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        TT.bn_prelu(x[:, :, :1, :1], p.weight, p.bias, None, None, p.prelu_weight, True, 1e-3)
    with pytest.raises(RuntimeError, match="dab_neck weight must have shape"):
        TT.dab_neck(x, torch.randn(3, 3, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE),
                    torch.randn(4, 3, device=DEVICE), p.weight, p.bias, p.prelu_weight, 1)


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    x = torch.empty(0, 3, 4, 5, device=DEVICE)
    p = bn_params(3, torch.float32, DEVICE)
    out, mean, var = TT.bn_prelu(x, p.weight, p.bias, p.running_mean, p.running_var,
                                 p.prelu_weight, training, 1e-3)
    assert out.shape == x.shape and mean.shape == (3,)
    assert torch.isnan(mean).all() if training else torch.equal(mean, p.running_mean)
    assert TT.dwconv3(x, dw_weight(3, "w", torch.float32, DEVICE), 2).shape == x.shape


@pytest.mark.skipif(GPU, reason="with a GPU every kernel is compiled and run by the tests above")
def test_kernels_compile_for_sm90_with_the_real_compiler():
    """The interpreter runs the kernels as Python; this compiles each one (float32, both layouts)
    to an sm_90 cubin, catching what only the compiler checks. Needs no GPU."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "dabnet_kernels.triton.compile_check",
                        "--dtypes", "fp32", "-q"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # every kernel of its list, in every autotune config (the count follows the config lists)
    listed = sum(len(compile_check_kernels("fp32", cl)) for cl in (0, 1))
    assert listed >= 40 and f"{listed} kernels compiled for sm_90" in r.stdout


def compile_check_kernels(dt, cl):
    """compile_check's list of (kernel, types, constexprs, warps, options, timed) for dt, cl."""
    import triton.language as tl

    from dabnet_kernels.triton import _common as cm, bn_prelu as bn, compile_check
    from dabnet_kernels.triton import dab_neck as dn, dwconv3 as dw

    return compile_check._kernels(cm, bn, dw, dn, tl, dt, cl)


def test_neck_autotuner_leaves_the_register_cap_out_for_float64():
    """float64 values take two registers each: the neck's 128-register config spilled them under
    triton 3.6, so the autotuner never times it for float64 (compile_check skips it too)."""
    from dabnet_kernels.triton import compile_check, dab_neck as dn

    capped = [c for c in dn.CONFIGS if compile_check.config_options(c).get("maxnreg")]
    assert len(capped) == 1
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert dn._prune(dn.CONFIGS, {"x_ptr": torch.empty(1, dtype=dtype)}) == dn.CONFIGS
    kept = dn._prune(dn.CONFIGS, {"x_ptr": torch.empty(1, dtype=torch.float64)})
    assert kept == [c for c in dn.CONFIGS if c is not capped[0]] and kept
    assert dn._dab_neck_kernel.early_config_prune is not None  # wired into the autotuner


def test_compile_check_fails_on_spills_only_where_a_config_runs_untimed(monkeypatch):
    """A spill in an autotune config after the first is listed (the autotuner times it against
    the others); in a first config or a kernel without autotuning it fails the check."""
    from dabnet_kernels.triton import compile_check

    timed = [k for k in compile_check_kernels("fp32", False) if k[5]]
    untimed = [k for k in compile_check_kernels("fp32", False) if not k[5]]
    assert timed and untimed
    monkeypatch.setattr(compile_check, "compile_kernel", lambda *a, **k: None)
    # under the interpreter the kernels are not JITFunctions: a stand-in with their names
    monkeypatch.setattr(compile_check, "jit_fn", lambda k: types.SimpleNamespace(
        __name__="kernel", arg_names=[]))
    monkeypatch.setattr(compile_check, "_kernels", lambda *a: timed)
    monkeypatch.setattr(compile_check, "_usage", lambda k: {"REG": "80", "STACK": "40"})
    spilled = []
    assert compile_check.check(90, ["fp32"], [False], verbose=False, spilled=spilled) == len(timed)
    assert len(spilled) == len(timed) and "40 B of stack" in spilled[0]
    monkeypatch.setattr(compile_check, "_kernels", lambda *a: untimed[:1])
    with pytest.raises(RuntimeError, match="spills"):
        compile_check.check(90, ["fp32"], [False], verbose=False, spilled=[])
