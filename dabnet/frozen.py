"""A frozen DABNet for CPU inference: the fused model's ops called in a fixed sequence on
parameters folded once, without the module tree.

    frozen = dabnet.freeze(model)                 # fp32, channels_last
    frozen = dabnet.freeze(model, torch.bfloat16) # the whole network in bfloat16
    logits = frozen(images)                       # as model(images) in eval, no autograd
    labels = frozen.predict(images)               # as model.predict(images)

What it saves over ``DABNet(fused=True)`` in eval (bench/README.md has the measurements):
- the per-forward Python of ~100 module calls, argument checks and BatchNorm folds; and from
  the second call at an input shape on, the Python between the ops: the sequence runs from C++
  (dabnet::frozen_forward, csrc/cpu/frozen.cpp), 2-4% of a forward at 256x512 on 2 cores;
- the reorder of each dense convolution's weight into oneDNN's layout, which F.conv2d does on
  every call: done once per input shape (channels_last fp32 and bf16; see FrozenConv);
- a memory pass per BN-PReLU that follows a convolution: it is applied in place on the conv's
  fresh output (``affine_prelu_``), whose cache lines the read has just brought in, where a new
  output also costs a read for ownership;
- the read of each DAB module's residual sum by the next module's first BN-PReLU: the sum and
  that BN-PReLU are one pass (``add_affine_prelu_``); a block's last sum is formed inside the
  concatenation that reads it (``cat_bn_prelu``'s ``add0``) and never written;
- two more passes: the last initial conv's BN-PReLU is applied inside the concatenation that
  follows it (``cat_bn_prelu``'s ``pre0``), and the widening downsampling block's 2x2 max-pool
  is taken there too (``pool_last``), never written.
The arithmetic is the fused model's: outputs equal ``model.eval()``'s to rounding (bit for bit
on the machines tested, fp32 and bf16).

It is a snapshot, as ``torch.jit.freeze``: the parameters and BatchNorm statistics are copied
when it is made, so later training or ``load_state_dict`` on the model does not reach it (freeze
again). The model may be plain or fused (the same state_dict). CPU only: on a GPU, CUDA graphs
remove the Python cost (bench/README.md).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import DABNet, fit_size

DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
_NECK = ("dconv3x1", "dconv1x3", "ddconv3x1", "ddconv1x3")


class FrozenConv:
    """A dense convolution of the frozen model. In channels_last fp32 / bf16, where oneDNN runs
    it, the weight is reordered once per input shape into oneDNN's blocked layout (as
    torch.compile's freezing does) and the convolution called on that; F.conv2d reorders the
    weight on every call (2% of the fp32 convolutions' time at 256x512 on 2 cores, 4% in bf16;
    bench/README.md). The same oneDNN kernel computes either way: the outputs are equal (but
    for inputs one pixel wide, where F.conv2d takes another path: equal to rounding)."""

    __slots__ = ("weight", "stride", "padding", "packed")
    SHAPES = 4  # packed weights kept per convolution, one per input shape (image size, batch)

    def __init__(self, weight: Tensor, stride: int, channels_last: bool):
        self.weight, self.stride, self.padding = weight, stride, weight.shape[-1] // 2
        self.packed = {} if channels_last and _packable(weight.dtype) else None

    def __call__(self, x: Tensor, ran: Optional[dict] = None) -> Tensor:
        """The convolution of x; ran[self] = the weight tensor it ran on (packed or not), where
        ran is given."""
        if self.packed is None or not torch.backends.mkldnn.enabled:
            if ran is not None:
                ran[self] = self.weight
            return F.conv2d(x, self.weight, None, self.stride, self.padding)
        pad, stride, key = [self.padding] * 2, [self.stride] * 2, tuple(x.shape)
        w = self.packed.get(key)
        if w is None:
            if len(self.packed) >= self.SHAPES:  # bounded: a server seeing many image sizes
                self.packed.clear()
            w = self.packed[key] = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, pad, stride, [1, 1], 1, list(key))
        if ran is not None:
            ran[self] = w
        return torch.ops.mkldnn._convolution_pointwise(x, w, None, pad, stride, [1, 1], 1,
                                                       "none", [], "")


def _packable(dtype: torch.dtype) -> bool:
    """Whether FrozenConv runs oneDNN on packed weights in this dtype (channels_last only: for
    NCHW inputs oneDNN returns its own layout): fp32, or bf16 where oneDNN has bf16 kernels."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class _Affine(NamedTuple):  # a folded eval BN-PReLU: PReLU(x * scale + shift)
    scale: Tensor
    shift: Tensor
    slope: Tensor


class _DAB(NamedTuple):
    bn_relu_1: _Affine
    conv3x3: FrozenConv
    conv3x3_bn: _Affine
    neck: tuple  # the arguments of torch.ops.dabnet.dab_neck after x, dilation last
    conv1x1: FrozenConv


class FrozenDABNet:
    """See the module docstring. Made by :func:`freeze`."""

    def __init__(self, model, dtype: torch.dtype = torch.float32, channels_last: bool = True):
        from dabnet_kernels import ops  # the compiled kernels: loaded when a model is frozen

        if not isinstance(model, DABNet):
            raise TypeError(f"freeze expects a dabnet.DABNet, got {type(model).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
        sd = model.state_dict()
        for k, v in sd.items():
            if v.device.type != "cpu":
                raise ValueError(f"freeze runs on CPU; {k} is on {v.device} (model.cpu() first)")
        self.dtype, self.classes = dtype, model.classes
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        def eps(prefix):  # of the BatchNorm at prefix.bn (the state_dict does not hold it)
            return model.get_submodule(prefix + ".bn").eps

        def conv(prefix, stride=1):
            w = sd[prefix + ".weight"].detach().to(dtype).clone(memory_format=self.memory_format)
            return FrozenConv(w, stride, channels_last)

        def bnp(prefix):  # prefix.bn and prefix.acti, as dabnet.model.BNPReLU names them
            g = lambda n: sd[f"{prefix}.bn.{n}"].detach()  # noqa: E731
            folded = ops.fold_bn_prelu(g("weight"), g("bias"), g("running_mean"),
                                       g("running_var"), sd[f"{prefix}.acti.weight"],
                                       eps(prefix), dtype)
            return _Affine(*(t.clone() for t in folded))  # the slope may be the model's tensor

        def dab(prefix, d):
            units = [f"{prefix}.{n}" for n in _NECK]
            weights = [sd[u + ".conv.weight"].detach() for u in units]
            params = [ops.BNPReLUParams(*(sd[f"{p}.{n}"].detach() for n in (
                "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "acti.weight")))
                for p in [u + ".bn_prelu" for u in units] + [prefix + ".bn_relu_2"]]
            e = {eps(p) for p in [u + ".bn_prelu" for u in units] + [prefix + ".bn_relu_2"]}
            if len(e) != 1:
                raise ValueError(f"{prefix}: the neck's BatchNorms differ in eps ({sorted(e)}); "
                                 f"the fused neck takes one")
            neck = tuple(t.clone() for t in ops.fold_dab_neck(weights, params, e.pop(), dtype))
            return _DAB(bnp(prefix + ".bn_relu_1"), conv(prefix + ".conv3x3.conv"),
                        bnp(prefix + ".conv3x3.bn_prelu"), neck + (d,),
                        conv(prefix + ".conv1x1.conv"))

        self.init = [(conv(f"init_conv.{i}.conv", 2 if i == 0 else 1),
                      bnp(f"init_conv.{i}.bn_prelu")) for i in range(len(model.init_conv))]
        self.bn_prelu = [bnp(f"bn_prelu_{i}") for i in (1, 2, 3)]
        self.down = [(conv(f"downsample_{i}.conv3x3.conv", 2), bnp(f"downsample_{i}.bn_prelu"),
                      getattr(model, f"downsample_{i}").widen) for i in (1, 2)]
        self.blocks: List[List[_DAB]] = [
            [dab(f"{b}.{name}", m.dilation) for name, m in getattr(model, b).named_children()]
            for b in ("DAB_Block_1", "DAB_Block_2")]
        self.classifier = conv("classifier.0.conv")
        self._plans = {}  # (input shape, oneDNN on) -> dabnet::frozen_forward's (params, plan)

    # ------------------------------------------------------------------------------- forward
    def __call__(self, x: Tensor) -> Tensor:
        """Logits (N, classes, H, W) of an (N, 3, H, W) image batch, as the model's forward."""
        return self._fit(x, labels=False)

    def predict(self, x: Tensor) -> Tensor:
        """Per-pixel labels (N, H, W), int64, as the model's predict."""
        return self._fit(x, labels=True)

    def _fit(self, x, labels):
        if isinstance(x, Tensor) and (x.device.type != "cpu" or x.dtype != self.dtype):
            raise ValueError(f"this frozen DABNet runs {self.dtype} on CPU; got a {x.dtype} "
                             f"tensor on {x.device} (x.to('cpu', {self.dtype}), or freeze with "
                             f"that dtype)")
        with torch.no_grad():
            return fit_size(lambda t: self._forward(t.contiguous(memory_format=self.memory_format),
                                                    labels), x)

    def _forward(self, x, labels):
        """The first forward at an input shape runs _forward_py (which packs the convolutions'
        weights for that shape) and records the tensors it ran on; later ones at that shape run
        the same calls from C++ (dabnet::frozen_forward, csrc/cpu/frozen.cpp): equal outputs,
        without the interpreter between the ops. Under another dabnet backend than the compiled
        kernels' (dabnet_kernels.set_backend: its pools and upsampling), always _forward_py."""
        from dabnet_kernels.backend import ops_for

        if ops_for(x) is not torch.ops.dabnet:
            return self._forward_py(x, labels)
        key = (tuple(x.shape), torch.backends.mkldnn.enabled)
        plan = self._plans.get(key)
        if plan is not None:
            return torch.ops.dabnet.frozen_forward(x, plan[0], plan[1], labels)
        ran = {}  # this call's own record (not state on the convs: calls may run concurrently)
        out = self._forward_py(x, labels, ran)
        if len(self._plans) >= FrozenConv.SHAPES:
            self._plans.clear()
        self._plans[key] = self._plan(ran)
        return out

    def _plan(self, ran):
        """(params, plan) of dabnet::frozen_forward, on the weights a _forward_py ran on (ran:
        FrozenConv -> weight; the order is csrc/cpu/frozen.cpp's)."""
        ts = []
        for c, a in self.init:
            ts += [ran[c], *a]
        for a in self.bn_prelu:
            ts += list(a)
        for c, a, _ in self.down:
            ts += [ran[c], *a]
        for m in self.blocks[0] + self.blocks[1]:
            ts += [*m.bn_relu_1, ran[m.conv3x3], *m.conv3x3_bn, *m.neck[:-1], ran[m.conv1x1]]
        ts.append(ran[self.classifier])
        plan = ([len(self.init), len(self.blocks[0]), len(self.blocks[1])]
                + [int(w) for _, _, w in self.down] + [c.stride for c, _ in self.init]
                + [m.neck[-1] for m in self.blocks[0] + self.blocks[1]])
        return ts, plan

    def _forward_py(self, x, labels, ran=None):
        from dabnet_kernels import ops

        D = torch.ops.dabnet
        inj1 = ops.avg_pool3x3s2(x)
        inj2 = ops.avg_pool3x3s2(inj1)
        inj3 = ops.avg_pool3x3s2(inj2)
        y = x
        for i, (c, a) in enumerate(self.init):
            y = c(y, ran)
            if i + 1 < len(self.init):
                D.affine_prelu_(y, *a)
        # the last init conv's BN-PReLU is applied on the way into the concatenation (pre0)
        b1_in = self._down(D.cat_bn_prelu([y, inj1], *self.bn_prelu[0], None, list(a)), 0, ran)
        b1_out, r1 = self._block(b1_in, self.blocks[0], ran)
        b2_in = self._down(D.cat_bn_prelu([b1_out, b1_in, inj2], *self.bn_prelu[1], r1), 1, ran)
        b2_out, r2 = self._block(b2_in, self.blocks[1], ran)
        out = self.classifier(D.cat_bn_prelu([b2_out, b2_in, inj3], *self.bn_prelu[2], r2), ran)
        size = tuple(x.shape[2:])
        return ops.upsample_argmax(out, size) if labels else ops.upsample_bilinear(out, size)

    def _down(self, x, i, ran=None):
        c, a, widen = self.down[i]
        y = c(x, ran)
        if widen:  # [conv, 2x2 max-pool of the input], the pool taken on the way in
            return torch.ops.dabnet.cat_bn_prelu([y, x], *a, None, None, True)
        torch.ops.dabnet.affine_prelu_(y, *a)
        return y

    @staticmethod
    def _block(x, mods: List[_DAB], ran=None):
        """The DAB modules in sequence: (y, r), the last module's output before its residual
        add and the residual (y + r is the block's output), or (x, None) for no modules. Each
        other module's residual sum is formed together with the next module's first BN-PReLU
        (add_affine_prelu_); the last one's is left to the concatenation that reads it
        (cat_bn_prelu's add0), so the block's output is never written."""
        if not mods:
            return x, None
        D = torch.ops.dabnet
        z = D.cat_bn_prelu([x], *mods[0].bn_relu_1)
        for i, m in enumerate(mods):
            y = m.conv3x3(z, ran)
            D.affine_prelu_(y, *m.conv3x3_bn)
            y = m.conv1x1(D.dab_neck(y, *m.neck), ran)
            if i + 1 == len(mods):
                return y, x
            z = D.add_affine_prelu_(y, x, *mods[i + 1].bn_relu_1)
            x = y


def freeze(model, dtype: torch.dtype = torch.float32, channels_last: bool = True) -> FrozenDABNet:
    """A frozen copy of a DABNet (plain or fused) for CPU inference in `dtype`: see
    dabnet.frozen. channels_last is the fast layout on CPU (oneDNN's convolutions and the fused
    kernels); NCHW is kept for comparison."""
    return FrozenDABNet(model, dtype, channels_last)
