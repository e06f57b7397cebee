"""Triton kernels at the limits a static review found (issue 15, item 4), run under the interpreter:
index arithmetic past 2**31, launch grids for N or C above 65535, the fp16 forward/backward
agreement of dwconv3_bn_prelu near the PReLU's kink, and triton 3.6's interpreter with numpy >= 2.4.

Tensors of 2**31 elements are allocated but never touched past their first few values (their pages
stay virtual), and the reductions are launched over one short split, so each case runs in seconds.
"""
import pytest
import torch

from dabnet_kernels import backend
from helpers import bn_params, dw_weight

if not backend.triton_available():  # pragma: no cover - depends on the installation
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("interpreter-only cases (the GPU suite runs the large tensors for real)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import dabnet_kernels.triton as T  # noqa: E402
from dabnet_kernels.triton import _common as cm, bn_prelu as bn  # noqa: E402

TT = torch.ops.dabnet_triton
BIG = (2**15, 1, 1, 2**16)  # N*H*W = 2**31: an int32 product wraps to -2**31
SPLIT = 16  # positions the one short split covers


@pytest.fixture
def one_split(monkeypatch):
    """Reductions launched as one split of SPLIT positions (BC=1, BP=SPLIT), so a 2**31-element
    tensor reads only its first values."""
    monkeypatch.setattr(cm, "reduce_split", lambda x, cl, tile=None: (1, SPLIT, SPLIT, 1))


def _big(dtype=torch.float32):
    """A (2**15, 1, 1, 2**16) tensor whose first SPLIT + 8 values are random, the rest untouched."""
    x = torch.empty(BIG, dtype=dtype)
    head = torch.randn(SPLIT + 8, dtype=torch.float64)
    x.view(-1)[:SPLIT + 8] = head.to(dtype)
    return x, head.to(dtype).double()


def test_grad_weight_sums_past_2_31_positions(one_split):
    g, gh = _big()
    x, xh = _big()
    w = dw_weight(1, "w", torch.float32)
    _, gw = TT.dwconv3_backward(g, x, w, 1, [False, True])
    xs = torch.cat([torch.zeros(1, dtype=torch.float64), xh])  # x[-1] = 0: the image's border
    want = torch.stack([(gh[:SPLIT] * xs[k:k + SPLIT]).sum() for k in range(3)])
    torch.testing.assert_close(gw.reshape(3).double(), want, rtol=1e-5, atol=1e-5)


def test_batch_stats_past_2_31_positions(one_split):
    x, xh = _big()
    mean, var = bn.batch_stats(x, False)
    v, m = torch.var_mean(xh[:SPLIT], unbiased=False)
    torch.testing.assert_close(mean, m.reshape(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, v.reshape(1), rtol=1e-5, atol=1e-6)


def test_bn_backward_sums_past_2_31_positions(one_split):
    g, gh = _big()
    x, xh = _big()
    p = bn_params(1, torch.float32)
    _, gw, gb, ga = TT.bn_prelu_backward(g, x, p.weight, p.bias, p.prelu_weight, p.running_mean,
                                         p.running_var, False, 1e-3, [False, True, True, True])
    d = {k: v.double() for k, v in p._asdict().items() if v is not None}
    invstd = torch.rsqrt(d["running_var"] + 1e-3)
    xhat = (xh[:SPLIT] - d["running_mean"]) * invstd
    y = xhat * d["weight"] + d["bias"]
    gy = torch.where(y > 0, gh[:SPLIT], d["prelu_weight"] * gh[:SPLIT])
    torch.testing.assert_close(gb.double(), gy.sum().reshape(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), (gy * xhat).sum().reshape(1), rtol=1e-5, atol=1e-5)
    want_ga = torch.where(y > 0, 0.0, gh[:SPLIT] * y).sum().reshape(1)
    torch.testing.assert_close(ga.double(), want_ga, rtol=1e-5, atol=1e-5)


@triton.jit
def _split_bounds_probe(out_ptr, s, M, CHUNK):
    start, end = cm.split_bounds(s, M, CHUNK)
    tl.store(out_ptr, start)
    tl.store(out_ptr + 1, end)


@pytest.mark.parametrize("s, M, chunk", [(2**20, 2**33, 2**12),  # s * CHUNK = 2**32 wraps to 0
                                         (2**19 - 1, 2**31 + 5, 2**12),  # start + CHUNK > 2**31
                                         (3, 100, 32)])  # the last split of a small tensor
def test_split_bounds_are_int64(s, M, chunk):
    out = torch.zeros(2, dtype=torch.int64)
    _split_bounds_probe[(1,)](out, s, M, chunk)
    assert out.tolist() == [s * chunk, min(s * chunk + chunk, M)]


# ------------------------------------------------------------------------------------ grids
MAX_X, MAX_YZ = 2**31 - 1, 65535  # CUDA's grid limits


def _fits(grid):
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return grid[0] <= MAX_X and max(grid[1:]) <= MAX_YZ


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("N, C, H, W", [(70000, 3, 4, 5), (2, 70000, 4, 5), (1, 300000, 1, 1),
                                        (66000, 66000, 1, 1)])
def test_launch_grids_fit_cuda_limits(N, C, H, W, cl):
    meta = dict(C=C, H=H, W=W, CL=cl, BLOCK=cm.CONFIGS[0].kwargs["BLOCK"])
    meta.update({k: f(meta) for k, f in cm.TILE.items()})
    assert _fits(cm.tile_grid(N, C, H, W)(meta))
    x = torch.empty((N, C, H, W), device="meta")
    bc, bp, chunk, splits = cm.reduce_split(x, cl)
    assert _fits(cm.reduce_grid(C, bc, splits))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_folded_grid_covers_every_image_and_channel(layout):
    """Images, channel blocks and pixel blocks all on axis 0: every element written once, right."""
    x = torch.randn(5, 70, 3, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = dw_weight(70, "w", torch.float32)
    torch.testing.assert_close(TT.dwconv3(x, w, 2),
                               torch.nn.functional.conv2d(x, w, padding=(0, 2), dilation=2,
                                                          groups=70))
    g = torch.randn_like(x)
    _, gw = TT.dwconv3_backward(g, x, w, 2, [False, True])
    xr = x.detach().requires_grad_()
    wr = w.detach().requires_grad_()
    torch.nn.functional.conv2d(xr, wr, padding=(0, 2), dilation=2, groups=70).backward(g)
    torch.testing.assert_close(gw, wr.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ fp16 forward vs backward
def test_dwconv3_bn_prelu_half_forward_is_what_backward_recomputes():
    """The backward recomputes the conv (rounded to fp16) and normalizes it in float32; the forward
    must produce the same pre-activation, bit for bit, or the PReLU branch of a value near 0
    differs between them. The running mean is set to the unrounded conv of a constant image, so
    every pre-activation lies within rounding of 0."""
    C = 64
    x = (torch.rand(1, C, 1, 1) + 0.5).half().expand(1, C, 6, 7).contiguous()
    w = (torch.randn(C, 1, 3, 1) * 0.7).half()
    p = bn_params(C, torch.float32)
    p.bias.zero_()
    p.prelu_weight.abs_()  # out > 0 exactly where the PReLU's positive branch was taken
    p.running_mean.copy_((w.double().reshape(C, 3).sum(1) * x.double()[0, :, 3, 3]).float())
    out = TT.dwconv3_bn_prelu(x, w, 1, p.weight, p.bias, p.running_mean, p.running_var,
                              p.prelu_weight, False, 1e-3)[0]
    y = TT.dwconv3(x, w, 1).float()  # what the backward normalizes
    mean, var = p.running_mean.double(), p.running_var.double()
    scale, shift = bn._scale_shift(p.weight, p.bias, mean, var, 1e-3, C)
    pre = y * scale.float()[:, None, None] + shift.float()[:, None, None]
    want = torch.where(pre > 0, pre, p.prelu_weight.float()[:, None, None] * pre).half()
    assert torch.equal(out, want)
    assert torch.equal(out > 0, pre > 0)  # the branch the backward takes (tl.where(y > 0, ...))


def test_bn_prelu_forward_is_what_backward_normalizes():
    """bn_prelu's forward pre-activation is x * scale + shift with the saved statistics, as the
    backward computes it (training: the statistics rounded to float32)."""
    x = torch.randn(2, 8, 5, 6) * 3 + 1
    p = bn_params(8, torch.float32)
    out, mean, var = TT.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, True, 1e-3)
    scale, shift = bn._scale_shift(p.weight, p.bias, mean, var, 1e-3, 8)
    pre = x * scale.float()[:, None, None] + shift.float()[:, None, None]
    assert torch.equal(out, torch.where(pre > 0, pre, p.prelu_weight[:, None, None] * pre))


# ---------------------------------------------------------- triton 3.6 interpreter, numpy 2.4
def test_range_bounds_survive_an_interpreter_that_ints_1_element_arrays(monkeypatch):
    """triton 3.6's interpreter turns a scalar (a 1-element array) into a range bound with
    int(array), which numpy >= 2.4 refuses; emulated here whatever the installed versions."""
    from triton.runtime import interpreter as ti

    def strict_int(self):
        if self.handle.data.ndim:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return int(self.handle.data)

    orig = ti._patch_lang_tensor

    def old_patch(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", strict_int)

    monkeypatch.setattr(ti, "_patch_lang_tensor", old_patch)
    x = torch.randn(2, 3, 9, 10)
    w = dw_weight(3, "h", torch.float32)
    _, gw = TT.dwconv3_backward(torch.ones_like(x), x, w, 1, [False, True])  # range(start, end)
    _, var = bn.batch_stats(x, False)  # and range(S) in the combine
    assert torch.isfinite(gw).all() and torch.isfinite(var).all()


# ------------------------------------------------------------------ tiles and autotune keys
def _tuner(kernel):
    while not isinstance(kernel, triton.runtime.autotuner.Autotuner):
        kernel = kernel.fn
    return kernel


@pytest.mark.parametrize("name", ["tap3", "dab_neck", "grad_x"])
def test_autotune_keys_name_batch_and_dilation(name):
    """The best tile depends on the batch (grid size) and on the dilation (what the taps hit in
    cache): each is an autotune key, so a tile tuned at N=1 or d=2 is not reused at N=8 or d=16."""
    from dabnet_kernels.triton import dab_neck as dn

    kernel = {"tap3": cm.tap3_kernel, "dab_neck": dn._dab_neck_kernel,
              "grad_x": bn._grad_x_kernel}[name]
    keys = set(_tuner(kernel).keys)
    assert {"N", "C", "H", "W", "CL"} <= keys
    if name != "grad_x":
        assert "d" in keys


def test_tile_configs_fit_registers():
    """At most 4 neck outputs and 16 stencil outputs per thread: the sm_90 compile_check measured
    120-170 registers at 4 neck outputs per thread and 234-255, with spills, at 8; a stencil at 16
    per thread took up to 168 in 16-bit and fp32 types (185 in fp64), without spills under
    triton 3.8."""
    from dabnet_kernels.triton import dab_neck as dn

    for configs, most in ((dn.CONFIGS, 4), (cm.CONFIGS, 16)):
        for c in configs:
            assert c.kwargs["BLOCK"] // (32 * c.num_warps) <= most, c
