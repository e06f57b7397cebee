"""Drop-in fused modules, and ``convert(model)`` that swaps them into any nn.Module.

A fused module holds the very children of the module it replaces (nn.Conv2d, nn.BatchNorm2d,
nn.PReLU) under the same attribute names, so parameters, buffers and state_dict keys do not
change: checkpoints load with ``strict=True`` into either form. Only ``forward`` differs: it calls
:mod:`dabnet_kernels.ops` with the children's tensors and with BatchNorm's own settings (eps,
momentum including None, track_running_stats, num_batches_tracked, each BN's training flag).
A BatchNorm child may also be an nn.SyncBatchNorm or a dabnet_kernels.sync.GlobalBatchNorm2d (as
``nn.SyncBatchNorm.convert_sync_batchnorm`` or ``dabnet.distributed.convert_sync_bn`` leave it):
in training under a process group of several ranks the fused module then normalises with the
statistics of every rank's batch (``sync.sync_bn_prelu``), on any device and backend.

    FusedBNPReLU       .bn, .acti                         ops.bn_prelu
    FusedConvBNPReLU   .conv (depthwise 3x1 / 1x3),       ops.dwconv3_bn_prelu
                       .bn_prelu.bn, .bn_prelu.acti
    FusedDABModule     the DAB module's eight children    ops.dab_neck for the neck (one kernel
                                                          in eval; composed units in training)
    FusedSequential    nn.Sequential(..., conv, bn, prelu, ..., bn, prelu, ...) with each
                       (depthwise conv, BN, PReLU) run and (BN, PReLU) pair run as one op

``convert`` recognises a module by its children *and* by what its forward computes: it traces the
forward with torch.fx (children as leaves) and swaps only when the trace is exactly the expected
expression (e.g. ``acti(bn(x))``), so a module that merely shares the attribute names is left
alone. Layouts other toolkits write are recognised the same way: nn.Sequential subclasses that
keep Sequential's forward (``ConvBNAct(nn.Sequential)``), any module whose forward applies its
children one after the other (whatever their names), and a PReLU inside a wrapper whose forward
is ``child(x)`` (``Activation("prelu")``); such chains become a FusedSequential holding the same
children under the same names. ``fusion_plan(model).skipped`` says why each candidate that was
not fused was left alone (a conv with a bias, ReLU instead of PReLU, ...).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
import operator
import weakref
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn

from . import ops, sync
from .reference import BNPReLUParams

__all__ = ["FusedBNPReLU", "FusedConvBNPReLU", "FusedDABModule", "FusedSequential", "Swap",
           "Skip", "FusionPlan", "convert", "fusion_plan"]


# ------------------------------------------------------------------------- structure checks
def conv_problem(conv) -> Optional[str]:
    """Why `conv` is not a depthwise 3x1 / 1x3 nn.Conv2d that dabnet_kernels.ops.dwconv3
    computes (groups = channels, no bias, stride 1, "same" zero padding), or None if it is."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not an nn.Conv2d"
    C = conv.in_channels
    kernel = tuple(conv.kernel_size)
    if conv.out_channels != C or conv.groups != C:
        return f"conv is not depthwise (groups={conv.groups}, {C} -> {conv.out_channels} channels)"
    if kernel not in ((3, 1), (1, 3)):
        return f"conv kernel is {kernel[0]}x{kernel[1]}, not 3x1 or 1x3"
    if conv.bias is not None:
        return "conv has a bias (the fused op computes none)"
    if tuple(conv.stride) != (1, 1):
        return f"conv has stride {tuple(conv.stride)}, not 1"
    if conv.padding_mode != "zeros":
        return f"conv pads with {conv.padding_mode!r}, not zeros"
    axis = 0 if kernel == (3, 1) else 1
    d = conv.dilation[axis]
    if conv.padding != "same" and tuple(conv.padding) != ((d, 0) if axis == 0 else (0, d)):
        return f"conv padding {tuple(conv.padding)} is not its dilation {d} (\"same\")"
    return None


def dw3_dilation(conv) -> Optional[int]:
    """The dilation along its 3 taps if `conv` is a depthwise 3x1 / 1x3 nn.Conv2d that ops.dwconv3
    computes (see conv_problem); None for any other module."""
    if conv_problem(conv) is not None:
        return None
    return conv.dilation[0 if tuple(conv.kernel_size) == (3, 1) else 1]


# BatchNorms with nn.BatchNorm2d's forward on 4-D input; the synchronised ones make the fused
# modules synchronise their training statistics across ranks (dabnet_kernels.sync).
_BN_TYPES = (nn.BatchNorm2d, *sync.SYNC_BN_TYPES)


_LEAF_TYPES = (nn.Conv2d, nn.PReLU, *_BN_TYPES)
_passthrough_seen = weakref.WeakKeyDictionary()  # wrapper -> (its child, whether it passes through)


def _passthrough(m) -> Optional[nn.Module]:
    """m's only child if m's forward is exactly ``child(x)`` (an activation wrapper such as
    ``Activation("prelu")`` holding an nn.PReLU; checked with torch.fx once per wrapper and
    child), else None."""
    if len(m._modules) != 1 or any(t is not None for t in (*m._parameters.values(),
                                                           *m._buffers.values())):
        return None
    (name, child), = m._modules.items()
    seen = _passthrough_seen.get(m)
    if seen is None or seen[0] is not child:
        seen = (child, child is not None and traced_expression(m) == (name, _X))
        _passthrough_seen[m] = seen
    return child if seen[1] else None


def _unwrap(m):
    """The module doing the work inside pass-through wrappers (m itself if it is none)."""
    while type(m) not in _LEAF_TYPES:
        inner = _passthrough(m)
        if inner is None:
            return m
        m = inner
    return m


def _is_bn(m, channels=None) -> bool:
    m = _unwrap(m)
    return type(m) in _BN_TYPES and (channels is None or m.num_features == channels)


def _pair_problem(bn, acti) -> Optional[str]:
    """Why (bn, acti) is not a BatchNorm2d + PReLU pair that ops.bn_prelu computes, or None."""
    b, a = _unwrap(bn), _unwrap(acti)
    if type(b) not in _BN_TYPES:
        return f"{type(b).__name__} is not a BatchNorm2d"
    if type(a) is not nn.PReLU:
        return f"the activation after {type(b).__name__} is {type(a).__name__}, not PReLU"
    if a.num_parameters not in (1, b.num_features):
        return f"PReLU has {a.num_parameters} slopes for {b.num_features} channels"
    return None


def _bn_pair_ok(bn, acti, channels=None) -> bool:
    """(bn, acti) is a pair ops.bn_prelu computes (see _pair_problem), of `channels` if given."""
    return _pair_problem(bn, acti) is None and _is_bn(bn, channels)


def _cbp_ok(conv, bn, acti) -> bool:
    return dw3_dilation(conv) is not None and _bn_pair_ok(bn, acti, conv.out_channels)


# --------------------------------------------------------------------- forward via the ops
def _bn_state(bn):
    """nn.BatchNorm2d.forward's choices: (running_mean, running_var, num_batches_tracked).

    Running statistics are used in eval, and updated in training only when tracked; the batch
    counter advances only in training with tracked statistics."""
    use_running = not bn.training or bn.track_running_stats
    rm = bn.running_mean if use_running else None
    rv = bn.running_var if use_running else None
    nbt = bn.num_batches_tracked if bn.training and bn.track_running_stats else None
    return rm, rv, nbt


def _conv_weight(w, x):
    """The conv weight in x's dtype under autocast (as nn.Conv2d gets it); else unchanged, so that
    a genuine dtype mismatch is still an error."""
    if w.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
        return w.to(x.dtype)
    return w


def _bn_prelu(x, bn, acti, conv=None):
    """acti(bn(x)), or acti(bn(conv(x))) for a depthwise 3-tap conv, as one op; synchronised across
    ranks when bn is a synchronised BatchNorm in training (sync.spans_ranks). bn and acti may be
    pass-through wrappers (_unwrap)."""
    bn, acti = _unwrap(bn), _unwrap(acti)
    rm, rv, nbt = _bn_state(bn)
    if sync.spans_ranks(bn):
        cw, d = (None, 1) if conv is None else (_conv_weight(conv.weight, x), dw3_dilation(conv))
        return sync.sync_bn_prelu(x, bn.weight, bn.bias, rm, rv, acti.weight, bn.momentum,
                                  bn.eps, nbt, bn.process_group, cw, d)
    if conv is None:
        return ops.bn_prelu(x, bn.weight, bn.bias, rm, rv, acti.weight, bn.training,
                            bn.momentum, bn.eps, nbt)
    return ops.dwconv3_bn_prelu(x, _conv_weight(conv.weight, x), dw3_dilation(conv), bn.weight,
                                bn.bias, rm, rv, acti.weight, bn.training, bn.momentum, bn.eps,
                                nbt)


def _conv_bn_prelu(x, conv, bn, acti):
    return _bn_prelu(x, bn, acti, conv)


# --------------------------------------------------------------------------------- modules
_NO_TORCHSCRIPT = ("the fused dabnet_kernels modules do not support TorchScript (torch.jit.trace "
                   "and torch.jit.script, which PyTorch has deprecated): export with "
                   "torch.export.export(model.eval(), (x,)) after `import dabnet_kernels`, or "
                   "with `dabnet export`; or script the unfused model")


class _NoTorchScript:
    """One clear error for TorchScript instead of a failure deep inside a forward."""

    def __prepare_scriptable__(self):  # torch.jit.script calls it on every submodule first
        raise RuntimeError(f"{type(self).__name__}: {_NO_TORCHSCRIPT}")

    def _refuse_tracing(self):
        if torch.jit.is_tracing():
            raise RuntimeError(f"{type(self).__name__}: {_NO_TORCHSCRIPT}")


class FusedBNPReLU(_NoTorchScript, nn.Module):
    """BatchNorm2d then PReLU in one op; children ``bn`` and ``acti`` as in the authors'
    BNPReLU. Build it like theirs (``FusedBNPReLU(channels)``, eps 1e-3) or around existing
    modules (``FusedBNPReLU.from_modules(bn, acti)``, which shares them)."""

    def __init__(self, channels: int, eps: float = 1e-3, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 num_slopes: Optional[int] = None):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps, momentum, affine, track_running_stats)
        self.acti = nn.PReLU(channels if num_slopes is None else num_slopes)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, acti: nn.PReLU) -> "FusedBNPReLU":
        if not _bn_pair_ok(bn, acti):
            raise ValueError(f"FusedBNPReLU needs an nn.BatchNorm2d (or nn.SyncBatchNorm, "
                             f"GlobalBatchNorm2d) and an nn.PReLU with 1 or "
                             f"num_features slopes, got {type(bn).__name__} and "
                             f"{type(acti).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bn, self.acti = bn, acti
        self.training = bn.training
        return self

    def forward(self, x):
        self._refuse_tracing()
        return _bn_prelu(x, self.bn, self.acti)

    def forward_cat(self, xs):
        """self(torch.cat(xs, 1)); in eval one kernel reads the pieces (no concatenation)."""
        self._refuse_tracing()
        bn, acti = _unwrap(self.bn), _unwrap(self.acti)
        if sync.spans_ranks(bn):
            return _bn_prelu(torch.cat(list(xs), 1), bn, acti)
        rm, rv, nbt = _bn_state(bn)
        return ops.cat_bn_prelu(xs, bn.weight, bn.bias, rm, rv, acti.weight, bn.training,
                                bn.momentum, bn.eps, nbt)


class FusedConvBNPReLU(_NoTorchScript, nn.Module):
    """Depthwise 3x1 or 1x3 conv, BatchNorm2d, PReLU in one op (``ops.dwconv3_bn_prelu``).

    Children as in the authors' ``Conv(..., groups=C, bn_acti=True)``: ``conv`` (nn.Conv2d,
    groups=C, no bias, stride 1, padding = dilation) and ``bn_prelu`` (a FusedBNPReLU with
    ``bn`` and ``acti``)."""

    bn_acti = True  # the authors' Conv flag, for code that reads it

    def __init__(self, channels: int, kernel=(3, 1), dilation: int = 1, eps: float = 1e-3,
                 momentum: Optional[float] = 0.1):
        super().__init__()
        kernel = tuple(kernel)
        if kernel not in ((3, 1), (1, 3)):
            raise ValueError(f"kernel must be (3, 1) or (1, 3), got {kernel}")
        along_h = kernel == (3, 1)
        self.conv = nn.Conv2d(channels, channels, kernel, 1,
                              (dilation, 0) if along_h else (0, dilation),
                              (dilation, 1) if along_h else (1, dilation), channels, bias=False)
        self.bn_prelu = FusedBNPReLU(channels, eps, momentum)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                     acti: nn.PReLU) -> "FusedConvBNPReLU":
        if not _cbp_ok(conv, bn, acti):
            raise ValueError(f"FusedConvBNPReLU needs a depthwise 3x1/1x3 nn.Conv2d (groups = "
                             f"channels, no bias, stride 1, padding = dilation) followed by a "
                             f"matching BatchNorm2d and PReLU; got {conv!r}, {bn!r}, {acti!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv = conv
        self.bn_prelu = FusedBNPReLU.from_modules(bn, acti)
        self.training = conv.training
        return self

    def forward(self, x):
        self._refuse_tracing()
        return _conv_bn_prelu(x, self.conv, self.bn_prelu.bn, self.bn_prelu.acti)


def _groups(mods):
    """[(kind, [indices])]: modules run in this order, grouped into fused ops where they can be."""
    out, i = [], 0
    while i < len(mods):
        if i + 2 < len(mods) and _cbp_ok(*mods[i:i + 3]):
            out.append(("dwconv3_bn_prelu", [i, i + 1, i + 2]))
            i += 3
        elif i + 1 < len(mods) and _bn_pair_ok(*mods[i:i + 2]):
            out.append(("bn_prelu", [i, i + 1]))
            i += 2
        else:
            out.append(("module", [i]))
            i += 1
    return out


class FusedSequential(_NoTorchScript, nn.Sequential):
    """nn.Sequential whose (depthwise 3-tap conv, BatchNorm2d, PReLU) runs and (BatchNorm2d,
    PReLU) pairs each run as one fused op. Same children, same indices, same state_dict."""

    def groups(self):
        """[(kind, [child indices])]: how forward runs the children."""
        return _groups(list(self._modules.values()))

    def forward(self, x):
        self._refuse_tracing()
        mods = list(self._modules.values())
        for kind, idx in self.groups():
            if kind == "dwconv3_bn_prelu":
                x = _conv_bn_prelu(x, *(mods[i] for i in idx))
            elif kind == "bn_prelu":
                x = _bn_prelu(x, *(mods[i] for i in idx))
            else:
                x = mods[idx[0]](x)
        return x


DAB_CHILDREN = ("bn_relu_1", "conv3x3", "dconv3x1", "dconv1x3", "ddconv3x1", "ddconv1x3",
                "bn_relu_2", "conv1x1")
NECK_CONVS = ("dconv3x1", "dconv1x3", "ddconv3x1", "ddconv1x3")


class FusedDABModule(_NoTorchScript, nn.Module):
    """The DAB module (Fig. 2c) with its neck (both depthwise branches, their sum and the last
    BN-PReLU) computed by ``ops.dab_neck``: one fused kernel in eval (BatchNorms folded), the
    fused conv+BN-PReLU units composed in training or whenever a gradient is needed.

    Children, names and forward as in the authors' DABModule: ``conv1x1(neck(conv3x3(
    bn_relu_1(x)))) + x``. Build it with ``from_module(dab_module)``; it shares the children.
    """

    def __init__(self, bn_relu_1, conv3x3, dconv3x1, dconv1x3, ddconv3x1, ddconv1x3, bn_relu_2,
                 conv1x1, fuse_units: bool = True):
        super().__init__()
        units = dict(dconv3x1=dconv3x1, dconv1x3=dconv1x3, ddconv3x1=ddconv3x1,
                     ddconv1x3=ddconv1x3, bn_relu_2=bn_relu_2)
        problem = _neck_problem(units)
        if problem:
            raise ValueError(f"not a DAB neck: {problem}")
        self.bn_relu_1, self.conv3x3 = bn_relu_1, conv3x3
        for name, m in units.items():
            setattr(self, name, m)
        self.conv1x1 = conv1x1
        self.dilation = dw3_dilation(_leaves(ddconv3x1)[0])
        if fuse_units:  # the children too (convert does this itself, to report each swap)
            for name, child in list(self.named_children()):
                setattr(self, name, _convert(child, name, FusionPlan()))

    @classmethod
    def from_module(cls, m: nn.Module, fuse_units: bool = True) -> "FusedDABModule":
        new = cls(*(getattr(m, n) for n in DAB_CHILDREN), fuse_units=fuse_units)
        new.training = m.training
        return new

    def neck(self, y):
        out = self._kept_neck(y)
        if out is not None:
            return out
        units = [_leaves(getattr(self, n)) for n in NECK_CONVS] + [_leaves(self.bn_relu_2)]
        bns = [u[1] for u in units]
        eps = bns[0].eps
        if all(not bn.training and bn.running_mean is not None and bn.eps == eps for bn in bns):
            weights = [_conv_weight(u[0].weight, y) for u in units[:4]]
            params = [BNPReLUParams(bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    acti.weight) for _, bn, acti in units]
            out = self._folded_neck(y, weights, params, eps, units)
            if out is not None:
                return out
            return ops.dab_neck(y, weights, params, self.dilation, training=False, eps=eps)
        local = self.dconv1x3(self.dconv3x1(y))
        context = self.ddconv1x3(self.ddconv3x1(y))
        return self.bn_relu_2(local + context)

    def _folded_neck(self, y, weights, params, eps, units):
        """The fused eval kernel on BN-folded parameters kept from the last call while the
        parameters are the same tensors at the same versions (an in-place update, a
        load_state_dict or a replaced parameter refolds): folding costs some thirty small tensor
        ops, about as long as the kernel itself at 256x512. None where ops.dab_neck must decide
        (gradients, autocast, torch.compile tracing, mismatched dtype or device, no kernel)."""
        tensors = [t for t in weights] + [t for p in params for t in p if t is not None]
        ns = ops.ops_for(y)
        if (ns is None or torch.compiler.is_compiling() or torch.is_autocast_enabled(y.device.type)
                or any(t.dtype != y.dtype or t.device != y.device for t in tensors)
                or ops._needs_grad(y, *tensors)):
            return None
        if any(t.is_inference() for t in tensors):
            # Inference tensors keep no version counter, so a fold of them could not notice an
            # in-place update (a load_state_dict under inference_mode): fold on every call.
            return ns.dab_neck(y, *ops.fold_dab_neck(weights, params, eps, y.dtype),
                               self.dilation)
        key = (y.dtype, y.device, eps)
        cache = self.__dict__.get("_fold_cache")
        if not (cache is not None and cache[0] == key and len(cache[1]) == len(tensors)
                and all(t is c and t._version == v for t, (c, v) in zip(tensors, cache[1]))):
            folded = ops.fold_dab_neck(weights, params, eps, y.dtype)
            cache = (key, [(t, t._version) for t in tensors], folded)
            self.__dict__["_fold_cache"] = cache
        self.__dict__["_fold_fast"] = _KeptNeck(self, units, key, ns, cache[2])
        return ns.dab_neck(y, *cache[2], self.dilation)

    def __getstate__(self):  # pickling, deepcopy: the kept fold is rebuilt on the next call
        state = super().__getstate__()
        state.pop("_fold_fast", None)  # it holds the op namespace, which does not pickle
        return state

    def _kept_neck(self, y):
        """The kept fold's kernel call if nothing it was made from has changed (see _KeptNeck),
        else None. Without it, rebuilding the argument lists to check the fold took ~95 us of
        Python per call around a 19 us kernel at small inputs (9 necks per forward)."""
        kept = self.__dict__.get("_fold_fast")
        if (kept is None or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.is_autocast_enabled(y.device.type) or not kept.valid(y)):
            return None
        return kept.ns.dab_neck(y, *kept.folded, self.dilation)

    def forward(self, x):
        self._refuse_tracing()
        y = self.conv1x1(self.neck(self.conv3x3(self.bn_relu_1(x))))
        if (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and y is not x
                and y._base is None and y.shape == x.shape and y.dtype == x.dtype):
            return y.add_(x)  # the residual into the conv's own fresh output: no new buffer
        return y + x


class _KeptNeck:
    """What a FusedDABModule's kept fold was made from, in a form that is cheap to check again:
    every module on the way from the DAB module to the neck's leaves (parent, name, child: the
    same objects), every parameter and buffer the fold read (owner dict, name, tensor, version:
    the same tensor, not modified in place), the BatchNorms (still in eval, same eps), and the
    input's dtype and device and the backend's op namespace."""

    def __init__(self, dab, units, key, ns, folded):
        self.key, self.ns, self.folded = key, ns, folded
        self.edges = [(dab, n, dab._modules[n]) for n in (*NECK_CONVS, "bn_relu_2")]
        for n in (*NECK_CONVS, "bn_relu_2"):
            self.edges += _leaf_edges(dab._modules[n])
        owners = []
        for conv, bn, acti in units:
            for mod, names in ((conv, ("weight",)), (bn, ("weight", "bias")), (acti, ("weight",))):
                if mod is not None:
                    owners += [(mod._parameters, n) for n in names]
            owners += [(bn._buffers, n) for n in ("running_mean", "running_var")]
        self.tensors = [(d, n, d.get(n), getattr(d.get(n), "_version", None)) for d, n in owners]
        self.bns = [bn for _, bn, _ in units]

    def valid(self, y) -> bool:
        return ((y.dtype, y.device) == self.key[:2]
                and all(not bn.training and bn.eps == self.key[2] for bn in self.bns)
                and all(p._modules.get(n) is c for p, n, c in self.edges)
                and all(d.get(n) is t and (t is None or t._version == v)
                        for d, n, t, v in self.tensors)
                and ops.ops_for(y) is self.ns)


def _leaf_edges(m):
    """(parent, name, child) for every module from unit m down to its leaves (as _leaves),
    through pass-through wrappers."""
    if isinstance(m, nn.Sequential):
        edges = [(m, k, c) for k, c in m._modules.items()]
    elif hasattr(m, "conv"):
        bp = m.bn_prelu
        edges = [(m, "conv", m.conv), (m, "bn_prelu", bp), (bp, "bn", bp.bn), (bp, "acti", bp.acti)]
    else:
        edges = [(m, "bn", m.bn), (m, "acti", m.acti)]
    for _, _, c in list(edges):
        while c is not _unwrap(c):
            (name, inner), = c._modules.items()
            edges.append((c, name, inner))
            c = inner
    return edges


_FUSED = (FusedBNPReLU, FusedConvBNPReLU, FusedDABModule, FusedSequential)


# ----------------------------------------------------- recognising modules by their forward
_X = "x"
_ADDS = (operator.add, operator.iadd, torch.add)


def traced_expression(m: nn.Module):
    """What m.forward computes from its single input, as a nested tuple over m's direct
    children: ``("acti", ("bn", "x"))`` for the authors' BNPReLU; additions are
    ``("add", a, b)`` with operands sorted. None if the forward does anything else (another
    function, a constant, a second input) or cannot be traced."""
    children = {id(c) for c in m.children()}

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, mod, qualname):
            return id(mod) in children

    try:
        graph = _Tracer().trace(m)
    except Exception:  # untraceable forward: not something convert may swap
        return None
    env = {}
    try:
        for node in graph.nodes:
            if node.op == "placeholder":
                if env:
                    return None
                env[node] = _X
            elif node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
                env[node] = (node.target, env[node.args[0]])
            elif (node.op == "call_function" and node.target in _ADDS
                  or node.op == "call_method" and node.target in ("add", "add_")) \
                    and len(node.args) == 2 and not node.kwargs:
                env[node] = ("add", *sorted((env[a] for a in node.args), key=repr))
            elif node.op == "output":
                return env[node.args[0]]
            else:
                return None
    except (KeyError, TypeError):  # an argument that is not a traced tensor
        return None
    return None


def _add(a, b):
    return ("add", *sorted((a, b), key=repr))


_BN_EXPR = ("acti", ("bn", _X))
_CONV_EXPR = ("bn_prelu", ("conv", _X))
_Y = ("conv3x3", ("bn_relu_1", _X))
_DAB_EXPR = _add(("conv1x1", ("bn_relu_2", _add(("dconv1x3", ("dconv3x1", _Y)),
                                                 ("ddconv1x3", ("ddconv3x1", _Y))))), _X)


def _child_names(m):
    return {n for n, _ in m.named_children()}


def _leaves(m):
    """(conv or None, bn, acti) of a unit already checked by _parts (no tracing: used in
    forward)."""
    if isinstance(m, nn.Sequential):
        mods = list(m)
        parts = tuple(mods) if len(mods) == 3 else (None, *mods)
    elif hasattr(m, "conv"):
        parts = m.conv, m.bn_prelu.bn, m.bn_prelu.acti
    else:
        parts = None, m.bn, m.acti
    return parts[0], _unwrap(parts[1]), _unwrap(parts[2])


def _parts(m):
    """(conv or None, bn, acti) of a conv-BN-PReLU or BN-PReLU unit (fused or not), or None."""
    if isinstance(m, FusedConvBNPReLU):
        return m.conv, m.bn_prelu.bn, m.bn_prelu.acti
    if isinstance(m, FusedBNPReLU):
        return None, m.bn, m.acti
    if isinstance(m, FusedSequential) or _plain_sequential(m):
        mods = list(m)
        if len(mods) == 3 and _cbp_ok(*mods):
            return tuple(mods)
        if len(mods) == 2 and _bn_pair_ok(*mods):
            return (None, *mods)
        return None
    names = _child_names(m)
    if names == {"bn", "acti"} and _bn_pair_ok(m.bn, m.acti) \
            and traced_expression(m) == _BN_EXPR:
        return None, m.bn, m.acti
    if names == {"conv", "bn_prelu"} and dw3_dilation(m.conv) is not None:
        inner = _parts(m.bn_prelu)
        if inner is not None and inner[0] is None and _cbp_ok(m.conv, *inner[1:]) \
                and traced_expression(m) == _CONV_EXPR:
            return (m.conv, *inner[1:])
    return None


def _neck_problem(units) -> Optional[str]:
    """Why units (the four neck convs and bn_relu_2) are not a neck dab_neck computes, or None."""
    shapes = dict(dconv3x1=(3, 1), dconv1x3=(1, 3), ddconv3x1=(3, 1), ddconv1x3=(1, 3))
    parts = {name: _parts(m) for name, m in units.items()}
    for name, shape in shapes.items():
        p = parts[name]
        if p is None or p[0] is None:
            return f"{name} is not a depthwise conv + BatchNorm2d + PReLU unit"
        if tuple(p[0].kernel_size) != shape:
            return f"{name} has kernel {tuple(p[0].kernel_size)}, expected {shape}"
    dil = {name: dw3_dilation(parts[name][0]) for name in shapes}
    if dil["dconv3x1"] != 1 or dil["dconv1x3"] != 1:
        return "the local branch (dconv3x1, dconv1x3) must have dilation 1"
    if dil["ddconv3x1"] != dil["ddconv1x3"]:
        return "ddconv3x1 and ddconv1x3 have different dilations"
    if parts["bn_relu_2"] is None or parts["bn_relu_2"][0] is not None:
        return "bn_relu_2 is not a BatchNorm2d + PReLU unit"
    channels = ({parts[n][0].in_channels for n in shapes}
                | {_unwrap(parts["bn_relu_2"][1]).num_features})
    if len(channels) != 1:
        return f"the neck's units have different channel counts {sorted(channels)}"
    return None


def _dab_problem(m) -> Optional[str]:
    """Why m, which has the DAB module's children, is not one FusedDABModule computes, or None."""
    problem = _neck_problem({n: getattr(m, n) for n in DAB_CHILDREN})
    if problem is not None:
        return problem
    if traced_expression(m) != _DAB_EXPR:
        return "its forward is not conv1x1(neck(conv3x3(bn_relu_1(x)))) + x"
    return None


def _plain_sequential(m) -> bool:
    """An nn.Sequential, or a subclass that keeps its forward (e.g. a toolkit's ConvBNAct)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _in_order(m):
    """[(name, child)] in the order m's forward applies them one after the other, when that is
    all it does: an nn.Sequential (or a subclass that keeps its forward), or a module whose
    forward is ``c(b(a(x)))`` over all its children, each once, with no parameters of its own.
    None otherwise."""
    if _plain_sequential(m):
        return [(n, c) for n, c in m._modules.items() if c is not None]
    if next(m.parameters(recurse=False), None) is not None \
            or next(m.buffers(recurse=False), None) is not None:
        return None
    expr, names = traced_expression(m), []
    while isinstance(expr, tuple) and len(expr) == 2:
        names.append(expr[0])
        expr = expr[1]
    if expr != _X or sorted(names) != sorted(m._modules):
        return None
    return [(n, m._modules[n]) for n in reversed(names)]


def _looks_depthwise(m) -> bool:
    return type(m) is nn.Conv2d and (m.groups > 1 or tuple(m.kernel_size) in ((3, 1), (1, 3)))


def _chain_notes(items) -> List[str]:
    """Why BatchNorms in a chain of (name, child) are not fused, or fused without the depthwise
    conv before them."""
    notes = []
    for i, (name, m) in enumerate(items):
        unit = _parts(m)
        if unit is None and not _is_bn(m):
            continue
        if unit is None:  # a BatchNorm: the next child must be its PReLU
            nxt = items[i + 1][1] if i + 1 < len(items) else None
            problem = "nothing follows it" if nxt is None else _pair_problem(m, nxt)
            if problem is not None:
                notes.append(f"{name}: BatchNorm not fused: {problem}")
                continue
        elif unit[0] is not None:
            continue
        prev_name, prev = items[i - 1] if i > 0 else (None, None)
        problem = conv_problem(prev) if _looks_depthwise(prev) else None
        if problem is not None:
            notes.append(f"{prev_name}: conv not fused ({problem}); only the "
                         "BatchNorm + PReLU after it is")
    return notes


def _fuse_one(m, notes: List[str]):
    """(fused replacement, kind) for m itself, or None; m's children are left to the caller.
    Appends to notes why m, or a part of it, looked fusable but is not fused."""
    if isinstance(m, _FUSED):
        return None
    if _child_names(m) == set(DAB_CHILDREN):
        problem = _dab_problem(m)
        if problem is None:
            return FusedDABModule.from_module(m, fuse_units=False), "dab_neck"
        notes.append(f"not a DAB module: {problem}")
    p = _parts(m)
    if p is not None and not _plain_sequential(m):  # the authors' BNPReLU and Conv
        if p[0] is None:
            return FusedBNPReLU.from_modules(p[1], p[2]), "bn_prelu"
        return FusedConvBNPReLU.from_modules(*p), "dwconv3_bn_prelu"
    candidate = any(_is_bn(c) or _parts(c) is not None for c in m.children())
    if not candidate:
        return None
    items = _in_order(m)
    if items is None:
        if any(_is_bn(c) for c in m.children()):
            notes.append("its forward is not its children applied one after the other, so "
                         "its BatchNorm + PReLU cannot be run as one op")
        return None
    notes += _chain_notes(items)
    counts = {}
    for kind, _ in _groups([c for _, c in items]):
        counts[kind] = counts.get(kind, 0) + 1
    counts.pop("module", None)
    if not counts:
        return None
    new = FusedSequential(OrderedDict(items))
    new.__dict__.update({k: v for k, v in vars(m).items() if not k.startswith("_")})
    return new, "Sequential(" + ", ".join(f"{k} x{n}" for k, n in counts.items()) + ")"


# --------------------------------------------------------------------------------- convert
class Swap(NamedTuple):
    """One replacement made by convert: the module's qualified name ("" for the root), the op
    it now runs, and the class it replaced."""

    name: str
    op: str
    replaced: str


class Skip(NamedTuple):
    """A module (qualified name, class) that looked fusable, in whole or in part, and why convert
    left it (or that part) as it is."""

    name: str
    kind: str
    reason: str


class FusionPlan(list):
    """The Swaps convert makes (a list), and in ``.skipped`` the Skips: why candidates were
    not swapped."""

    def __init__(self, swaps=(), skipped=()):
        super().__init__(swaps)
        self.skipped: List[Skip] = list(skipped)


def _convert(m, name, plan: FusionPlan):
    notes: List[str] = []
    fused = _fuse_one(m, notes)
    plan.skipped += [Skip(name, type(m).__name__, why) for why in notes]
    if fused is not None:
        plan.append(Swap(name, fused[1], type(m).__name__))
        m = fused[0]
    for cname, child in list(m.named_children()):
        new = _convert(child, f"{name}.{cname}" if name else cname, plan)
        if new is not child:
            setattr(m, cname, new)
    return m


def fusion_plan(model: nn.Module) -> FusionPlan:
    """The swaps convert(model) would make, without changing model; ``.skipped`` says why the
    modules that looked fusable but are not were left alone."""
    plan = FusionPlan()
    _convert(copy.deepcopy(model), "", plan)
    return plan


def convert(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Returns `model` with fused modules swapped in for

    * every DAB module (children bn_relu_1, conv3x3, dconv3x1, dconv1x3, ddconv3x1, ddconv1x3,
      bn_relu_2, conv1x1 and the authors' forward): FusedDABModule, neck by ``ops.dab_neck``;
    * every depthwise 3x1/1x3 conv + BatchNorm2d + PReLU unit written like the authors' Conv
      (``conv``, ``bn_prelu.bn``, ``bn_prelu.acti``): FusedConvBNPReLU;
    * every BatchNorm2d + PReLU written like the authors' BNPReLU (``bn``, ``acti``):
      FusedBNPReLU;
    * every nn.Sequential (or subclass keeping its forward), or module whose forward applies its
      children one after the other, holding (depthwise conv, BN, PReLU) runs or (BN, PReLU)
      pairs, a PReLU possibly inside a pass-through wrapper: FusedSequential (same children,
      same names).

    Parameters, buffers and state_dict keys are unchanged (the fused modules hold the same
    children). With inplace=False (default) the model is deep-copied first; with inplace=True the
    original modules are rewired and share their parameters with the result. Always use the
    returned module (the root itself may be replaced). Forward hooks registered on a replaced
    module are not carried over. verbose=True prints each swap and why candidates were not
    fused; fusion_plan(model) lists them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    plan = FusionPlan()
    model = _convert(model, "", plan)
    if verbose:
        print(f"dabnet_kernels.convert: {len(plan)} module(s) swapped")
        for s in plan:
            print(f"  {s.name or '<root>'}: {s.replaced} -> {s.op}")
        for s in plan.skipped:
            print(f"  not fused: {s.name or '<root>'} ({s.kind}): {s.reason}")
    return model
