"""Triton kernels for the dabnet ops, registered as ``torch.ops.dabnet_triton.<op>``.

The schemas are those of the C++ ops (``dabnet_kernels.ops.schema``); fake kernels and autograd
formulas are the shared ones (``dabnet_kernels.ops.register``). Each op is a custom op whose
implementation launches the kernels: opaque to torch.compile, which uses the fake kernels (the
alternative, ``torch.library.triton_op``, failed opcheck's fake-tensor test under the interpreter).
CUDA tensors run compiled kernels; CPU tensors run only under the Triton interpreter
(TRITON_INTERPRET=1 set before this package is imported), which is how the tests run without GPU.

``AVAILABLE`` is True when triton imports and the ops are registered.
"""
from __future__ import annotations

AVAILABLE = False
ERROR = None  # why AVAILABLE is False

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    ERROR = e
else:
    import torch

    from .. import ops as _ops
    from . import _common, bn_prelu, dab_neck, dwconv3, dwconv3_bn_prelu  # one module per op

    NAMESPACE = "dabnet_triton"
    _IMPLS = {"dwconv3": dwconv3.dwconv3, "dwconv3_backward": dwconv3.dwconv3_backward,
              "bn_prelu": bn_prelu.bn_prelu, "bn_prelu_backward": bn_prelu.bn_prelu_backward,
              "dwconv3_bn_prelu": dwconv3_bn_prelu.dwconv3_bn_prelu,
              "dab_neck": dab_neck.dab_neck}
    _lib = torch.library.Library(NAMESPACE, "DEF")
    for _name in _ops.OP_NAMES:
        _lib.define(_ops.schema(_name))
        _lib.impl(_name, _IMPLS[_name], "CUDA")
        _lib.impl(_name, _IMPLS[_name], "CPU")  # under TRITON_INTERPRET=1 only (checked per call)
    _ops.register(NAMESPACE)
    INTERPRETED = _common.INTERPRETED
    AVAILABLE = True
