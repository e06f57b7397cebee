"""pytest-benchmark suite of the op micro-benchmarks (kept apart from tests/):

    pytest bench/ --benchmark-only                        # small shapes, this machine's device
    pytest bench/ --benchmark-only --bench-res 512x1024   # DABNet's real shapes for that input
    pytest bench/ --benchmark-only --bench-device cpu

Each benchmark also checks its result (ours against the reference; the reference against itself
in float64), so a wrong kernel fails here as well as in tests/.
"""
import os

import pytest
import torch

_has_gpu = torch.cuda.is_available()
if not _has_gpu:  # as in tests/: Triton (if ever imported) runs under its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    g = parser.getgroup("dabnet bench")
    g.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                help="device of the op benchmarks (default: cuda if visible, else cpu)")
    g.addoption("--bench-res", default="128x256",
                help="network input HxW the op shapes derive from (block-1 neck at H/4 x W/4, "
                     "block-2 neck at H/8 x W/8); default 128x256: small and fast")


def _device(config):
    d = config.getoption("--bench-device") or ("cuda" if _has_gpu else "cpu")
    if d == "cuda" and not _has_gpu:
        raise pytest.UsageError("--bench-device cuda: no CUDA GPU is visible")
    return d


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        from bench.ops_bench import backends_for

        dev = _device(metafunc.config)
        metafunc.parametrize("impl", backends_for(dev) + ["reference"])


@pytest.fixture(scope="session")
def bench_device(pytestconfig):
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def bench_res(pytestconfig):
    text = pytestconfig.getoption("--bench-res")
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise pytest.UsageError(f"--bench-res: expected HxW, got {text!r}")
    if h % 8 or w % 8:
        raise pytest.UsageError(f"--bench-res: {text}: H and W must be multiples of 8")
    return (h, w)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
