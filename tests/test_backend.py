"""Backend selection: set_backend / use_backend / DABNET_BACKEND, routing, and clear errors."""
import types

import pytest
import torch

from dabnet_kernels import _lib, backend, ops, reference
from helpers import bn_params, clone_params, dw_weight, make_input


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    """Every test starts from the default: no set_backend, no DABNET_BACKEND."""
    monkeypatch.delenv("DABNET_BACKEND", raising=False)
    monkeypatch.setitem(backend._state, "name", None)


def _on(device_type):
    """Something with x.device of the given type: enough for resolve(), no GPU needed."""
    return types.SimpleNamespace(device=torch.device(device_type))


def test_default_is_auto_and_cpu_tensors_run_the_cpp_kernels():
    x = make_input((1, 2, 3, 4))
    assert backend.get_backend() == "auto"
    assert backend.resolve(x) == "cpu"
    assert backend.ops_for(x) is torch.ops.dabnet


def test_set_backend_selects_and_auto_restores():
    x = make_input((1, 2, 3, 4))
    backend.set_backend("reference")
    assert backend.get_backend() == "reference" and backend.ops_for(x) is None
    backend.set_backend("cpu")
    assert backend.ops_for(x) is torch.ops.dabnet
    backend.set_backend("auto")
    assert backend.resolve(x) == "cpu"


def test_use_backend_restores_the_previous_one_even_on_error():
    backend.set_backend("cpu")
    with backend.use_backend("reference"):
        assert backend.get_backend() == "reference"
        with backend.use_backend("auto"):
            assert backend.get_backend() == "auto"
        assert backend.get_backend() == "reference"
    assert backend.get_backend() == "cpu"
    with pytest.raises(KeyError):
        with backend.use_backend("reference"):
            raise KeyError("boom")
    assert backend.get_backend() == "cpu"


def test_environment_variable_and_its_precedence(monkeypatch):
    x = make_input((1, 2, 3, 4))
    w = dw_weight(2, "h")
    monkeypatch.setenv("DABNET_BACKEND", "reference")
    assert backend.get_backend() == "reference" and backend.ops_for(x) is None
    assert torch.equal(ops.dwconv3(x, w, 2), reference.dwconv3(x, w, 2))
    with backend.use_backend("cpu"):  # set_backend / use_backend win over the environment
        assert backend.resolve(x) == "cpu"
    monkeypatch.setenv("DABNET_BACKEND", "")
    assert backend.get_backend() == "auto"


@pytest.mark.parametrize("name", ["cudnn", "CPU", "", "triton2"])
def test_unknown_names_are_value_errors_listing_the_choices(name, monkeypatch):
    with pytest.raises(ValueError, match="unknown dabnet backend.*auto, cuda, triton, cpu"):
        backend.set_backend(name)
    with pytest.raises(ValueError, match="unknown dabnet backend"):
        with backend.use_backend(name):
            pass
    assert backend.get_backend() == "auto"  # a rejected name changes nothing
    if name:
        monkeypatch.setenv("DABNET_BACKEND", name)
        with pytest.raises(ValueError, match=f"unknown dabnet backend '{name}'"):
            ops.dwconv3(make_input((1, 2, 3, 4)), dw_weight(2, "h"), 1)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with backend.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available: x is on cpu"):
            ops.dwconv3(make_input((1, 2, 3, 4)), dw_weight(2, "h"), 1)


def test_cuda_backend_without_cuda_kernels_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_lib, "has_cuda_kernels", lambda: False)
    with backend.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="this build has no CUDA kernels"):
            backend.resolve(_on("cuda"))


def test_cpu_backend_on_other_devices_is_a_clear_error():
    with backend.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="backend 'cpu' is not available: x is on meta"):
            backend.resolve(torch.empty(1, 2, 3, 4, device="meta"))


def test_triton_backend_errors(monkeypatch):
    x = make_input((1, 2, 3, 4))
    with backend.use_backend("triton"):
        if backend.triton_available():
            with pytest.raises(RuntimeError, match="not available for meta tensors"):
                backend.resolve(torch.empty(1, 2, 3, 4, device="meta"))
        monkeypatch.setattr(backend, "_triton_interpreted", lambda: False)
        monkeypatch.setattr(backend, "triton_available", lambda: True)
        with pytest.raises(RuntimeError, match="only under the Triton interpreter.*INTERPRET=1"):
            backend.resolve(x)
        monkeypatch.setattr(backend, "triton_available", lambda: False)
        with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
            ops.dwconv3(x, dw_weight(2, "h"), 1)


@pytest.mark.parametrize("cuda_kernels,triton,expected",
                         [(True, True, "cuda"), (False, True, "triton"),
                          (False, False, "reference")])
def test_auto_on_cuda_tensors_prefers_cuda_then_triton_then_reference(cuda_kernels, triton,
                                                                      expected, monkeypatch):
    monkeypatch.setattr(_lib, "has_cuda_kernels", lambda: cuda_kernels)
    monkeypatch.setattr(backend, "triton_available", lambda: triton)
    assert backend.resolve(_on("cuda")) == expected
    assert backend.resolve(_on("meta")) == "reference"  # no kernels for other devices


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_reference_and_cpu_backends_agree(training, layout):
    """Every public op, outputs, gradients and running statistics, under both backends."""
    C = 3
    x0 = make_input((2, C, 6, 7), layout)
    w0 = dw_weight(C, "w")
    p0 = bn_params(C, nbt=True)
    weights = [dw_weight(C, a) for a in "hwhw"]
    bns0 = [bn_params(C, nbt=True) for _ in range(5)]

    def run(name):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        p = clone_params(p0)
        bns = [clone_params(b) for b in bns0]
        with backend.use_backend(name):
            y = ops.dwconv3(x, w, 2)
            y = ops.bn_prelu(y, *p[:5], training, 0.1, 1e-3, p.num_batches_tracked)
            y = ops.dwconv3_bn_prelu(y, w, 3, *p[:5], training, 0.1, 1e-3, p.num_batches_tracked)
            y = ops.dab_neck(y, weights, bns, 2, training=training)
            y.square().sum().backward()
            with torch.no_grad():  # eval, no grad: the fused neck kernel (cpu backend)
                z = ops.dab_neck(x0, weights, bns0, 3)
        return [y, z, x.grad, w.grad, p.running_mean, p.running_var, p.num_batches_tracked,
                bns[0].running_var, bns[4].running_mean]

    for a, b in zip(run("reference"), run("cpu")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
