import pytest
import torch

from dabnet_kernels import ops, reference
from helpers import DILATIONS, LAYOUTS, dw_weight, make_input, tol


@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", DILATIONS + (40,))
@pytest.mark.parametrize("shape", [(1, 3, 7, 9), (3, 5, 11, 6)])
def test_forward_matches_reference(shape, dilation, layout, along):
    x = make_input(shape, layout)
    w = dw_weight(shape[1], along)
    out = ops.dwconv3(x, w, dilation)
    torch.testing.assert_close(out, reference.dwconv3(x, w, dilation), **tol(x.dtype))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_output_keeps_memory_format(layout):
    x = make_input((2, 4, 5, 6), layout, dtype=torch.float32)
    out = ops.dwconv3(x, dw_weight(4, "w", torch.float32), 2)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dilation", [1, 3, 16])
def test_float32_and_backward_match_reference(dilation, layout, along):
    x = make_input((3, 8, 13, 17), layout, torch.float32, requires_grad=True)
    w = dw_weight(8, along, torch.float32).requires_grad_()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(3, 8, 13, 17)
    ops.dwconv3(x, w, dilation).backward(g)
    reference.dwconv3(xr, wr, dilation).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **tol(torch.float32))
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [1, 5, 12])
def test_every_dilation_against_every_width(width):
    """Along W the NCHW kernels read interior columns in place and gather the border columns:
    every split of a row (no interior, W <= 2d, d >= W) in the forward and both gradients."""
    for dilation in range(1, width + 2):
        x = make_input((2, 3, 4, width), requires_grad=True)
        w = dw_weight(3, "w").requires_grad_()
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        g = torch.randn(2, 3, 4, width, dtype=x.dtype)
        out, ref = ops.dwconv3(x, w, dilation), reference.dwconv3(xr, wr, dilation)
        torch.testing.assert_close(out, ref, **tol(x.dtype), msg=f"forward, d={dilation}")
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, xr.grad, **tol(x.dtype), msg=f"grad_x, d={dilation}")
        torch.testing.assert_close(w.grad, wr.grad, **tol(x.dtype), msg=f"grad_w, d={dilation}")
        gx, _ = torch.ops.dabnet.dwconv3_backward(g, x.detach(), w.detach(), dilation,
                                                  [True, False])  # grad_x alone: other loop
        torch.testing.assert_close(gx, xr.grad, **tol(x.dtype), msg=f"grad_x only, d={dilation}")


@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", [1, 2, 9])
def test_gradcheck(dilation, layout, along):
    x = make_input((2, 3, 5, 7), layout, requires_grad=True)
    w = dw_weight(3, along).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: ops.dwconv3(x, w, dilation), (x, w))


def test_bfloat16_and_half_on_cpu():
    x = make_input((2, 4, 9, 10), dtype=torch.float32)
    w = dw_weight(4, "h", torch.float32)
    ref = reference.dwconv3(x, w, 2)
    for dt in (torch.bfloat16, torch.float16):
        out = ops.dwconv3(x.to(dt), w.to(dt), 2)
        assert out.dtype == dt
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=5e-2)


def test_grad_weight_deterministic_across_threads():
    x = make_input((2, 16, 33, 40), "channels_last", torch.float32)
    w = dw_weight(16, "w", torch.float32)
    g = torch.randn_like(x)
    n = torch.get_num_threads()
    results = []
    for threads in (1, max(2, n)):
        torch.set_num_threads(threads)
        results.append(torch.ops.dabnet.dwconv3_backward(g, x, w, 4, [False, True])[1])
    torch.set_num_threads(n)
    assert torch.equal(results[0], results[1])
