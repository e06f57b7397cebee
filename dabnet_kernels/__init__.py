"""dabnet-kernels: fused CPU/CUDA/Triton kernels for DABNet's depthwise asymmetric bottleneck."""
from . import ops, reference  # noqa: F401
from .backend import get_backend, set_backend, use_backend  # noqa: F401
from ._lib import cpu_isa, empty_cpu_cache, has_cuda_kernels  # noqa: F401
from .malloc import tune_malloc  # noqa: F401
from .ops import BNPReLUParams, bn_prelu, dab_neck, dwconv3, dwconv3_bn_prelu  # noqa: F401
from . import nn, sync  # noqa: F401
from .nn import convert, fusion_plan  # noqa: F401

__version__ = "0.1.0"
