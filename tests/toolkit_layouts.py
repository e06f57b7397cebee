"""DABNet written the way general segmentation toolkits write their models (modelled on the
layout issue 18 describes for zh320/realtime-semantic-segmentation-pytorch, in our own code):
conv units as nn.Sequential subclasses, the activation inside a wrapper module chosen by name
(with an `inplace` flag it passes on only to activations that take one), each unit's BatchNorm
with PyTorch's default eps, an in-place residual, and DAB modules whose two depthwise branches
are nn.Sequential of such units. Used by tests/test_nn_toolkits.py to check that convert finds
the fusable units by what their forward computes."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Activation(nn.Module):
    """An activation picked by name; of the kwargs, PReLU takes num_parameters, the others
    inplace."""

    KINDS = {"relu": nn.ReLU, "prelu": nn.PReLU, "hardswish": nn.Hardswish}

    def __init__(self, kind, **kwargs):
        super().__init__()
        cls = self.KINDS[kind.lower()]
        kwargs.pop("inplace" if cls is nn.PReLU else "num_parameters", None)
        self.activation = cls(**kwargs)

    def forward(self, x):
        return self.activation(x)


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in, c_out, kernel=3, stride=1, dilation=1, groups=1, bias=False,
                 act="prelu", **act_kwargs):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = ((kh - 1) // 2 * dilation, (kw - 1) // 2 * dilation)
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias),
            nn.BatchNorm2d(c_out),
            Activation(act, num_parameters=c_out, **act_kwargs))


class DWConvBNAct(ConvBNAct):
    def __init__(self, channels, kernel, dilation=1, act="prelu", bias=False, **act_kwargs):
        super().__init__(channels, channels, kernel, 1, dilation, channels, bias, act,
                         **act_kwargs)


class BNAct(nn.Sequential):
    def __init__(self, channels, act="prelu"):
        super().__init__(nn.BatchNorm2d(channels), Activation(act, num_parameters=channels))


class NormAct(nn.Module):
    """BN + activation as a plain module with names other than the authors' (norm, act)."""

    def __init__(self, channels, act="prelu"):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.act = Activation(act, num_parameters=channels, inplace=True)

    def forward(self, x):
        x = self.norm(x)
        return self.act(x)


class ToolkitDAB(nn.Module):
    def __init__(self, channels, dilation, act="prelu", bias=False):
        super().__init__()
        h = channels // 2
        self.pre = BNAct(channels, act)
        self.init_conv = ConvBNAct(channels, h, 3, act=act)
        self.left = nn.Sequential(DWConvBNAct(h, (3, 1), act=act, bias=bias),
                                  DWConvBNAct(h, (1, 3), act=act))
        self.right = nn.Sequential(DWConvBNAct(h, (3, 1), dilation, act=act),
                                   DWConvBNAct(h, (1, 3), dilation, act=act))
        self.post = NormAct(h, act)
        self.last_conv = nn.Conv2d(h, channels, 1, bias=False)

    def forward(self, x):
        residual = x
        x = self.init_conv(self.pre(x))
        x = self.left(x) + self.right(x)
        x = self.last_conv(self.post(x))
        x += residual
        return x


class ToolkitDABNet(nn.Module):
    """A small DABNet in the toolkit's style: stem, one downsampling, `blocks` DAB modules with
    growing dilation, a BN-act after the concatenation, a 1x1 classifier and the x4 upsampling."""

    def __init__(self, classes=5, channels=16, blocks=3, act="prelu", bias_in_block=None):
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, channels // 2, 3, 2, act=act),
                                  ConvBNAct(channels // 2, channels // 2, 3, act=act))
        self.down = ConvBNAct(channels // 2, channels, 3, 2, act=act)
        self.blocks = nn.Sequential(*(ToolkitDAB(channels, 2 ** (i + 1), act,
                                                 bias=(i == bias_in_block))
                                      for i in range(blocks)))
        self.cat_act = BNAct(2 * channels, act)
        self.classifier = nn.Conv2d(2 * channels, classes, 1)

    def forward(self, x):
        size = x.shape[2:]
        y = self.down(self.stem(x))
        y = self.cat_act(torch.cat([self.blocks(y), y], 1))
        return F.interpolate(self.classifier(y), size, mode="bilinear", align_corners=False)
