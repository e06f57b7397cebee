"""DABNet as specified by the paper (Table 1, Sec. 3), state_dict-compatible with the authors'
release: module names (init_conv, bn_prelu_1, downsample_1, DAB_Block_1.DAB_Module_1_0, ...)
match theirs, so their checkpoints load with strict=True.

    Layer  Operator                 Mode       Channel  Output (512x1024 input)
    1-3    3x 3x3 Conv              s2, s1, s1 32       256x512     init_conv
    4      Downsampling             -          64       128x256     downsample_1
    5-7    3x DAB module            dilated 2  64       128x256     DAB_Block_1
    8      Downsampling             -          128      64x128      downsample_2
    9-14   6x DAB module            d 4,4,8,8,16,16    128      64x128      DAB_Block_2
    15     1x1 Conv                 -          classes  64x128      classifier
    16     Bilinear interpolation   x8         classes  512x1024
plus input injection (the image average-pooled to each scale, concatenated after each stage) and
the inter-block concatenations (each block's first and last module outputs).

Input: an (N, 3, H, W) image batch of any H, W >= 1. The widening downsampling concatenates a
stride-2 conv (ceil) with a 2x2 max-pool (floor) of the 1/2-scale maps, so it needs ceil(H/2) and
ceil(W/2) even (H, W = 0 or 3 mod 4, e.g. 512x1024). Other sizes are zero-padded at the bottom
and right to the next such size, and the logits are cropped back to H x W; sizes that fit are
not padded at all (when traced for export, every size goes through the pad, by 0 rows where
none is needed, so that the exported graph takes any size).

fused=True runs the same network on dabnet_kernels' fused ops: every BNPReLU as one bn_prelu op,
every depthwise Conv + BN-PReLU as one dwconv3_bn_prelu op, and each DAB module's neck as one
dab_neck kernel in eval (dabnet_kernels.convert does the swap; parameters, buffers, state_dict
keys, outputs, gradients and running statistics are those of fused=False).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-3


class BNPReLU(nn.Module):
    """BatchNorm2d (eps 1e-3) then per-channel PReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.acti = nn.PReLU(channels)

    def forward(self, x):
        return self.acti(self.bn(x))


class Conv(nn.Module):
    """Conv2d without bias, optionally followed by BNPReLU (the authors' Conv block)."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0, dilation=1, groups=1,
                 bn_acti=False):
        super().__init__()
        self.bn_acti = bn_acti
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=False)
        if bn_acti:
            self.bn_prelu = BNPReLU(c_out)

    def forward(self, x):
        x = self.conv(x)
        return self.bn_prelu(x) if self.bn_acti else x


class DABModule(nn.Module):
    """Depth-wise Asymmetric Bottleneck (Fig. 2c): BN-PReLU, 3x3 conv halving the channels, two
    depthwise branches (3x1 -> 1x3, and the same dilated by d), their sum, BN-PReLU, 1x1 conv back
    to c channels, residual add."""

    def __init__(self, c: int, d: int = 1):
        super().__init__()
        h = c // 2
        self.bn_relu_1 = BNPReLU(c)
        self.conv3x3 = Conv(c, h, 3, 1, padding=1, bn_acti=True)
        self.dconv3x1 = Conv(h, h, (3, 1), 1, padding=(1, 0), groups=h, bn_acti=True)
        self.dconv1x3 = Conv(h, h, (1, 3), 1, padding=(0, 1), groups=h, bn_acti=True)
        self.ddconv3x1 = Conv(h, h, (3, 1), 1, padding=(d, 0), dilation=(d, 1), groups=h,
                              bn_acti=True)
        self.ddconv1x3 = Conv(h, h, (1, 3), 1, padding=(0, d), dilation=(1, d), groups=h,
                              bn_acti=True)
        self.bn_relu_2 = BNPReLU(h)
        self.conv1x1 = Conv(h, c, 1, 1, padding=0)
        self.dilation = d

    def neck(self, x):
        """Both depthwise branches, summed, then BN-PReLU (what dab_neck fuses)."""
        local = self.dconv1x3(self.dconv3x1(x))
        context = self.ddconv1x3(self.ddconv3x1(x))
        return self.bn_relu_2(local + context)

    def forward(self, x):
        y = self.conv3x3(self.bn_relu_1(x))
        return self.conv1x1(self.neck(y)) + x


class DownSamplingBlock(nn.Module):
    """3x3 stride-2 conv, concatenated with a 2x2 max-pool of the input when the block widens
    (the ENet initial block), then BN-PReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.widen = c_in < c_out
        self.conv3x3 = Conv(c_in, c_out - c_in if self.widen else c_out, 3, 2, padding=1)
        if self.widen:
            self.max_pool = nn.MaxPool2d(2, stride=2)
        self.bn_prelu = BNPReLU(c_out)

    def forward(self, x):
        y = self.conv3x3(x)
        if not self.widen:
            return self.bn_prelu(y)
        if getattr(self.bn_prelu, "forward_cat", None) is None:  # the plain model
            pooled = self.max_pool(x)
        else:  # the fused model: the same values, faster
            from dabnet_kernels.ops import max_pool2x2

            pooled = max_pool2x2(x)
        return _cat_bn_prelu(self.bn_prelu, [y, pooled])


class InputInjection(nn.Module):
    """The image, average-pooled (3x3, stride 2) `times` times."""

    def __init__(self, times: int):
        super().__init__()
        self.pool = nn.ModuleList(nn.AvgPool2d(3, stride=2, padding=1) for _ in range(times))

    def forward(self, x):
        return self.pool_from(x, 0)

    def pool_from(self, y, done: int):
        """The result from y, the image already pooled `done` times (the same pools run on the
        same values, so it equals forward(image) exactly)."""
        for pool in list(self.pool)[done:]:
            y = pool(y)
        return y


def _pad_to_fit(n: int) -> int:
    """Rows (or columns) to add so that ceil(n / 2) is even: 0 if n = 0 or 3 mod 4, else 2 or 1.
    Arithmetic rather than a lookup, so that it also traces (ONNX export, torch.compile)."""
    return (3 - n % 4) % 3


def _tracing() -> bool:
    """Whether forward is being traced for export (torch.export, ONNX export, jit.trace): one
    graph for every size. torch.compile is not: its guards recompile for a size that takes the
    other branch, so it keeps the eager model's cheaper path."""
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export())


class DABNet(nn.Module):
    BLOCK_2_DILATIONS = (4, 4, 8, 8, 16, 16)

    def __init__(self, classes: int = 19, block_1: int = 3, block_2: int = 6, fused: bool = False):
        super().__init__()
        self.classes = classes
        # Layers 1-3: three 3x3 convs, the first with stride 2.
        self.init_conv = nn.Sequential(
            Conv(3, 32, 3, 2, padding=1, bn_acti=True),
            Conv(32, 32, 3, 1, padding=1, bn_acti=True),
            Conv(32, 32, 3, 1, padding=1, bn_acti=True),
        )
        self.down_1, self.down_2, self.down_3 = (InputInjection(k) for k in (1, 2, 3))
        self.bn_prelu_1 = BNPReLU(32 + 3)
        # Layers 4-7: downsampling, DAB block 1 (d=2).
        self.downsample_1 = DownSamplingBlock(32 + 3, 64)
        self.DAB_Block_1 = nn.Sequential()
        for i in range(block_1):
            self.DAB_Block_1.add_module(f"DAB_Module_1_{i}", DABModule(64, d=2))
        self.bn_prelu_2 = BNPReLU(128 + 3)
        # Layers 8-14: downsampling, DAB block 2 (d = 4, 4, 8, 8, 16, 16).
        self.downsample_2 = DownSamplingBlock(128 + 3, 128)
        self.DAB_Block_2 = nn.Sequential()
        for i in range(block_2):
            d = self.BLOCK_2_DILATIONS[i % len(self.BLOCK_2_DILATIONS)]
            self.DAB_Block_2.add_module(f"DAB_Module_2_{i}", DABModule(128, d=d))
        self.bn_prelu_3 = BNPReLU(256 + 3)
        # Layer 15: 1x1 classifier (layer 16, the x8 bilinear upsampling, is in forward).
        self.classifier = nn.Sequential(Conv(256 + 3, classes, 1, 1, padding=0))
        self.fused = fused
        if fused:
            from dabnet_kernels import convert  # needs the compiled kernels: only when asked

            convert(self, inplace=True)

    def forward(self, x):
        return self._fit(x, labels=False)

    @torch.no_grad()
    def predict(self, x):
        """Per-pixel class labels (N, H, W), int64: forward(x).argmax(1). The fused model on CPU
        computes them from the 1/8-scale logits without materializing the full-size ones."""
        return self._fit(x, labels=True)

    def _fit(self, x, labels):
        return fit_size(lambda t: self._forward(t, labels), x)

    def injections(self, x):
        """down_1(x), down_2(x), down_3(x): the image pooled 1, 2 and 3 times. The authors' code
        pools the image afresh for each; here each level pools the previous one once more: the
        same values, 3 pools instead of 6 (at 512x1024 on 2 CPU cores: 5 ms instead of 15)."""
        if self.fused:  # the same pools, in a form that is faster on channels_last CPU tensors
            from dabnet_kernels.ops import avg_pool3x3s2 as pool

            d1 = pool(x)
            d2 = pool(d1)
            return d1, d2, pool(d2)
        d1 = self.down_1(x)
        d2 = self.down_2.pool_from(d1, 1)
        return d1, d2, self.down_3.pool_from(d2, 2)

    def _forward(self, x, labels=False):
        inj1, inj2, inj3 = self.injections(x)
        stem = self.init_conv(x)
        cat0 = _cat_bn_prelu(self.bn_prelu_1, [stem, inj1])
        b1_in = self.downsample_1(cat0)
        b1_out = self.DAB_Block_1(b1_in)
        cat1 = _cat_bn_prelu(self.bn_prelu_2, [b1_out, b1_in, inj2])
        b2_in = self.downsample_2(cat1)
        b2_out = self.DAB_Block_2(b2_in)
        cat2 = _cat_bn_prelu(self.bn_prelu_3, [b2_out, b2_in, inj3])
        out = self.classifier(cat2)
        size = tuple(x.shape[2:])
        if self.fused:
            from dabnet_kernels import ops

            return ops.upsample_argmax(out, size) if labels else ops.upsample_bilinear(out, size)
        out = F.interpolate(out, size, mode="bilinear", align_corners=False)
        return out.argmax(1) if labels else out


def fit_size(forward, x):
    """forward(x) for an (N, 3, H, W) image batch of any H, W >= 1: x zero-padded at the bottom
    and right to the next size DABNet takes (see the module docstring), the output cropped back
    to H x W. Shared by DABNet and the frozen model (dabnet.frozen)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"DABNet expects an (N, 3, H, W) image batch, got {shape}")
    H, W = x.shape[2:]
    if H < 1 or W < 1 or not x.is_floating_point():
        raise ValueError(f"DABNet expects a floating-point image of at least 1x1 pixels, got "
                         f"shape {tuple(x.shape)} and dtype {x.dtype}")
    pad_h, pad_w = _pad_to_fit(H), _pad_to_fit(W)
    if _tracing():
        # H and W stand for every size: always pad (by 0 where none is needed) rather than
        # record the branch taken at the example size. The crop is a gather: a slice's
        # strides tie H, W to the padded size in the exporter's shape guards, and Inductor
        # drops a slice it takes for a no-op at the example size.
        out = forward(F.pad(x, (0, pad_w, 0, pad_h)))
        rows, cols = (torch.arange(n, device=x.device) for n in (H, W))
        return out.index_select(-2, rows).index_select(-1, cols)
    if pad_h or pad_w:
        return forward(F.pad(x, (0, pad_w, 0, pad_h)))[..., :H, :W]
    return forward(x)


def _cat_bn_prelu(unit, xs):
    """unit(torch.cat(xs, 1)); a fused BN-PReLU reads the pieces without concatenating them."""
    fused = getattr(unit, "forward_cat", None)
    return fused(xs) if fused is not None else unit(torch.cat(xs, 1))
