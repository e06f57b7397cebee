import os

import pytest

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. This must be set
# before triton is first imported.
try:
    import torch

    _has_gpu = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not _has_gpu, reason="needs a CUDA GPU (none visible)")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
