"""The op benchmark cases: DABNet's real shapes, their inputs, and the functions that are timed.

Shapes: an input image of HxW puts DAB block 1's neck at C=32, H/4 x W/4 (dilation 2 on the
context branch, 1 on the local one) and block 2's at C=64, H/8 x W/8 (dilations 4, 8, 16).
Modes: "fwd" is inference (eval BatchNorm; for dab_neck the single fused kernel), "fwd+bwd" is a
training step's forward and backward (batch statistics; for dab_neck its composed path).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

from dabnet_kernels import ops, reference
from dabnet_kernels.reference import BNPReLUParams

OPS = ("dwconv3", "bn_prelu", "dwconv3_bn_prelu", "dab_neck")
MODES = ("fwd", "fwd+bwd")
RESOLUTIONS = ((256, 512), (512, 1024), (1024, 2048))  # the paper's Table 5
BLOCKS = {1: dict(C=32, down=4, dilations=(1, 2)),     # 1 = the local (plain) branch
          2: dict(C=64, down=8, dilations=(1, 4, 8, 16))}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "cl")
EPS = 1e-3


@dataclass(frozen=True)
class OpCase:
    op: str
    mode: str
    res: tuple  # the network's input image (H, W)
    block: int
    batch: int
    dilation: int  # 0 for bn_prelu (no conv)
    orient: str    # "3x1" (along H) or "1x3" (along W) for the conv ops, "-" otherwise
    dtype: str
    layout: str

    @property
    def C(self):
        return BLOCKS[self.block]["C"]

    @property
    def hw(self):
        d = BLOCKS[self.block]["down"]
        return self.res[0] // d, self.res[1] // d

    @property
    def shape(self):
        return (self.batch, self.C, *self.hw)

    @property
    def training(self):
        return self.mode == "fwd+bwd"

    @property
    def esize(self):
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def min_bytes(self) -> int:
        """Bytes that must move at minimum: each input read once, each output written once.
        fwd: read x, write y. fwd+bwd: that, plus read grad_y and x, write grad_x (the parameter
        gradients are per-channel and counted with the parameters)."""
        n = self.batch * self.C * self.hw[0] * self.hw[1]
        passes = 2 if self.mode == "fwd" else 5
        n_params = {"dwconv3": 3, "bn_prelu": 5, "dwconv3_bn_prelu": 8,
                    "dab_neck": 4 * 3 + 5 * 5}[self.op] * self.C
        return (passes * n + (1 if self.mode == "fwd" else 2) * n_params) * self.esize

    def label(self) -> str:
        d = f" d{self.dilation}" if self.dilation else ""
        o = f" {self.orient}" if self.orient != "-" else ""
        return (f"{self.res[0]}x{self.res[1]} b{self.block}{d}{o} N{self.batch} "
                f"{self.dtype} {self.layout}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(res=list(self.res), C=self.C, H=self.hw[0], W=self.hw[1],
                 min_bytes=self.min_bytes(), label=self.label())
        return d


# ----------------------------------------------------------------------------- case lists
def _expand(op, mode, resolutions, batches, dtypes, layouts, blocks=(1, 2), orients=("3x1", "1x3"),
            dilations=None):
    for res, blk, n, dt, lay in itertools.product(resolutions, blocks, batches, dtypes, layouts):
        if op == "bn_prelu":
            yield OpCase(op, mode, res, blk, n, 0, "-", dt, lay)
            continue
        dils = BLOCKS[blk]["dilations"] if dilations is None else [
            d for d in dilations if d in BLOCKS[blk]["dilations"]]
        if op == "dab_neck":  # the neck holds both branches: only its context dilation varies
            for d in dils:
                if d > 1:
                    yield OpCase(op, mode, res, blk, n, d, "-", dt, lay)
            continue
        for d, o in itertools.product(dils, orients):
            yield OpCase(op, mode, res, blk, n, d, o, dt, lay)


def train_batch(device: str) -> int:
    """Batch of the key training shapes: 8 on GPU; 2 on CPU, where a batch of 8 at the 512x1024
    input takes seconds per call and would make the CPU run far longer than ~10 minutes."""
    return 8 if device == "cuda" else 2


def quick_cases(device: str):
    """A few shapes: each op and mode at the 512x1024 input's block-1 neck, plus block 2's for
    dab_neck; batch 1 for inference, 8 for training on GPU (1 on CPU, to stay under a minute)."""
    out = []
    tb = 8 if device == "cuda" else 1
    for op in OPS:
        for mode in MODES:
            out += list(_expand(op, mode, [(512, 1024)], [1 if mode == "fwd" else tb], ["fp32"],
                                ["nchw"], blocks=(1,) if op != "dab_neck" else (1, 2),
                                orients=("3x1",), dilations=(2, 4)))
    return out


def default_cases(device: str, full: bool = False):
    """Main grid (fp32, NCHW; every block, dilation, orientation, batch 1 and 8) at every Table 5
    resolution on GPU, at 256x512 on CPU, where the 512x1024 input adds the key shapes (see
    is_key); plus a dtype/layout sweep at the 512x1024 input (block 1, d2, 3x1; batch 1 for fwd,
    train_batch for fwd+bwd). --full: the whole
    product of every resolution, batch, dilation, orientation, dtype and layout. On CPU only fp32
    runs (the CPU kernels' reduced-precision paths are not what a CPU user runs)."""
    dtypes = ["fp32"] + (["fp16", "bf16"] if device == "cuda" else [])
    every = [(op, mode) for op in OPS for mode in MODES]
    if full:
        return [c for op, mode in every
                for c in _expand(op, mode, RESOLUTIONS, [1, 8], dtypes, LAYOUTS)]
    res = RESOLUTIONS if device == "cuda" else RESOLUTIONS[:1]
    cases = [c for op, mode in every for c in _expand(op, mode, res, [1, 8], ["fp32"], ["nchw"])]
    tb = train_batch(device)
    if device != "cuda":
        cases += [c for op, mode in every
                  for c in _expand(op, mode, [(512, 1024)], [1 if mode == "fwd" else tb], ["fp32"],
                                   ["nchw"], orients=("3x1",))]
    cases += [c for op, mode in every
              for c in _expand(op, mode, [(512, 1024)], [1 if mode == "fwd" else tb], dtypes,
                               LAYOUTS, blocks=(1,), orients=("3x1",), dilations=(2,))
              if (c.dtype, c.layout) != ("fp32", "nchw")]
    return cases


def is_key(case: OpCase) -> bool:
    """The key shapes: the 512x1024 input, 3x1, batch 1 for inference and for training
    train_batch(device) (8 on GPU, 2 on CPU: the grids never hold batch 2 on GPU)."""
    train = case.batch in (train_batch("cuda"), train_batch("cpu"))
    return (case.res == (512, 1024) and (case.batch == 1 if case.mode == "fwd" else train)
            and case.orient in ("3x1", "-"))


# --------------------------------------------------------------------------------- inputs
def make_inputs(case: OpCase, device: str, seed: int = 0) -> dict:
    """x, the depthwise weights, BN-PReLU parameters and grad_out for one case (all in the case's
    dtype, as after model.half(); random, never zeros)."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    C = case.C

    def rnd(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=g) * (hi - lo) + lo).to(device=device, dtype=dt)

    def act(t):
        if case.layout == "cl":
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    k = 4 if case.op == "dab_neck" else 1
    shapes = [(C, 1, 3, 1), (C, 1, 1, 3)] * 2 if case.op == "dab_neck" else \
        [(C, 1, 3, 1) if case.orient != "1x3" else (C, 1, 1, 3)]
    weights = [rnd(*s, lo=-0.6, hi=0.6) for s in shapes[:k]]
    bns = [BNPReLUParams(rnd(C, lo=0.5, hi=1.5), rnd(C, lo=-0.2, hi=0.2), rnd(C, lo=-0.3, hi=0.3),
                         rnd(C, lo=0.5, hi=2.0), rnd(C, lo=0.05, hi=0.4))
           for _ in range(5 if case.op == "dab_neck" else 1)]
    return {"x": act(rnd(*case.shape)), "w": weights, "bn": bns, "gy": act(rnd(*case.shape))}


def set_bytes(case: OpCase) -> int:
    n = case.batch * case.C * case.hw[0] * case.hw[1] * case.esize
    return n * (1 if case.mode == "fwd" else 2)


# ------------------------------------------------------------------------------ functions
def forward(lib, case: OpCase, t: dict):
    """The op's forward through `lib` (dabnet_kernels.ops, or .reference for the baseline)."""
    x, w, bn, tr = t["x"], t["w"], t["bn"], case.training
    if case.op == "dwconv3":
        return lib.dwconv3(x, w[0], case.dilation)
    if case.op == "bn_prelu":
        return lib.bn_prelu(x, *bn[0][:5], tr, 0.1, EPS)
    if case.op == "dwconv3_bn_prelu":
        return lib.dwconv3_bn_prelu(x, w[0], case.dilation, *bn[0][:5], tr, 0.1, EPS)
    return lib.dab_neck(x, w, bn, case.dilation, tr, 0.1, EPS)


def grad_leaves(case: OpCase, t: dict):
    """The tensors a training step differentiates: x, conv weights, BN affine and PReLU slopes."""
    leaves = [t["x"], *t["w"]]
    if case.op != "dwconv3":
        for p in t["bn"]:
            leaves += [p.weight, p.bias, p.prelu_weight]
    return leaves


def prepare(case: OpCase, t: dict) -> dict:
    """Marks the leaves of a fwd+bwd case as requiring grad (in place; returns t)."""
    if case.mode == "fwd+bwd":
        for leaf in grad_leaves(case, t):
            leaf.requires_grad_(True)
    return t


def runner(case: OpCase, fwd):
    """A callable taking one input set: fwd(t) for inference; fwd then autograd.grad over every
    leaf for training (no .grad accumulation, so repeated calls do the same work)."""
    if case.mode == "fwd":
        def run(t):
            with torch.no_grad():
                return fwd(t)
        return run

    def run(t):
        out = fwd(t)
        return torch.autograd.grad(out, grad_leaves(case, t), t["gy"], allow_unused=True)
    return run


def impl_forwards(case: OpCase, device: str, backends, compiled: bool):
    """{impl name: forward(t)} for one case.

    Ours: the public API on each backend (set around the call by the caller, see ops_bench);
    for dab_neck inference also the kernel on BatchNorm folded once ahead (what a converted model
    does), named "<backend>:prefolded". Baselines: "reference" (F.conv2d groups=C / F.batch_norm /
    F.prelu: cuDNN/oneDNN/ATen) and "compile" (torch.compile of the reference).
    """
    fns = {}
    for b in backends:
        fns[b] = lambda t: forward(ops, case, t)
        if case.op == "dab_neck" and case.mode == "fwd":
            fns[f"{b}:prefolded"] = None  # built by prefolded() once the inputs exist
    fns["reference"] = lambda t: forward(reference, case, t)
    if compiled:
        fns["compile"] = "compile"
    return fns


def prefolded(case: OpCase, t: dict, backend: str):
    """The dab_neck kernel with its BatchNorms folded once, outside the timed call."""
    from dabnet_kernels.backend import use_backend

    with use_backend(backend):
        ns = ops.ops_for(t["x"])
    folded = ops.fold_dab_neck(t["w"], t["bn"], EPS, t["x"].dtype)
    return lambda tt: ns.dab_neck(tt["x"], *folded, case.dilation)
