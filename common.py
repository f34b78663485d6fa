"""The plumbing every stage shares, so that the chapters can teach TiTok and nothing else.

Nothing here is TiTok: a reader learning TiTok can skip this file. It keeps the chapters honest:
one error class and one way for a command line to fail (a single line, never a traceback), flag
types that refuse bad values before any work starts, files written atomically, weights read without
running pickled code, images opened in any PIL mode, and what both trainers use: the sample stream,
the torchrun set-up, checkpoints and exact resume, the official LR schedule, AdamW groups and EMA.

Sections: 1 errors and flags, 2 files and weights, 3 images, datasets and the sample stream,
4 torchrun, 5 checkpoints, exact resume and logs, 6 the LR schedule, AdamW and the EMA.
This module imports no chapter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# 1. Errors and flags: bad input ends as one line `error: ...` and exit status 1.


class UserError(ValueError):
    """Bad input (a missing file, a wrong checkpoint...): the CLIs print `error: <one line>`."""


@contextlib.contextmanager
def one_line_errors():
    """Every CLI runs in this: a UserError, an OSError or running out of memory ends it as
    `error: <one line>`, printed by rank 0."""
    try:
        yield
    except (UserError, OSError, RuntimeError) as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line says it
            message = message.splitlines()[-1].partition(": ")[2]
        if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in message:
            size = re.search(r"(?i)tried to allocate ([\d.]+ ?\w+)", message)
            batch = getattr(Parser.last_parsed, "batch_size", "?")
            message = f"out of memory (tried to allocate {size[1] if size else 'more'}) at "
            message += f"--batch-size {batch} per process; lower --batch-size"
        elif isinstance(e, RuntimeError) and not isinstance(e, UserError):
            raise
        rank = int(os.environ.get("RANK", "0"))
        sys.exit(f"error: {' '.join(message.split())}" if rank == 0 else 1)


def note(message: str) -> None:
    """A line on stderr, from rank 0 only (torchrun would print it once per process)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are UserErrors too: `error: ... (see --help)`. The
    settings parsed last are kept, for the out-of-memory line's batch size."""

    last_parsed = None

    def error(self, message: str) -> None:
        raise UserError(f"{message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        Parser.last_parsed = super().parse_args(args, namespace)
        return Parser.last_parsed


def positive_int(s: str) -> int:
    value = int(s)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return value


def nonneg_int(s: str) -> int:
    """The counts that may be 0 (--eval-size, --seed, --keep...)."""
    value = int(s)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {s}")
    return value


def float_in(low: float, high: float, below_high: bool = False):
    """An argparse type: a finite float in [low, high], or [low, high) with below_high."""

    def number(s: str) -> float:  # (argparse names the function in "invalid number value")
        value = float(s)
        inside = low <= value <= high and not (below_high and value == high)
        if not (math.isfinite(value) and inside):
            bracket = ")" if below_high else "]"
            raise argparse.ArgumentTypeError(
                f"must be finite, in [{low:g}, {high:g}{bracket}, got {s}"
            )
        return value

    return number


def output_file(s: str) -> Path:
    """An argparse type: a file to write, not a folder (missing folders are made), with a name
    short enough for the files written beside it: .<name>.<pid>.tmp must fit in 255 bytes."""
    if Path(s).is_dir():
        raise argparse.ArgumentTypeError(f"{s} is a folder; give a file name")
    if len(Path(s).name.encode()) > 242:
        raise argparse.ArgumentTypeError(f"the file name is longer than 242 bytes: {s}")
    return Path(s)


def add_workers_flag(parser: argparse.ArgumentParser) -> None:
    """--workers: the processes decoding image files. Default: this process's share of the cores
    (torchrun's LOCAL_WORLD_SIZE processes share a node), at most 8."""
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    default = max(1, min(8, cores))
    help = f"processes decoding image files (default: this process's share of the cores, {default})"
    parser.add_argument("--workers", type=nonneg_int, default=default, help=help)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_arg(s: str) -> torch.device:
    """An argparse type: cpu, cuda or cuda:N, and cuda only where CUDA is available."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", s) or (s != "cpu" and not torch.cuda.is_available()):
        raise argparse.ArgumentTypeError(
            f"{s!r}: give cpu, cuda or cuda:N, and cuda only where CUDA is available"
        )
    return torch.device(s)


def add_recipe_flags(parser: argparse.ArgumentParser, recipe_class) -> None:
    """Every field of a recipe dataclass becomes a flag (default: the recipe's value). Counts are
    > 0 (steps that may start at 0, the seed and --keep >= 0), rates >= 0, probabilities and decays
    in [0, 1] (Adam's betas in [0, 1)); a recipe class may list a field's values in CHOICES."""
    group = parser.add_argument_group("recipe values (default: the recipe's)")
    choices = getattr(recipe_class, "CHOICES", {})
    for f in dataclasses.fields(recipe_class):
        if f.name == "name":
            continue
        beta = f.name.startswith("beta")
        unit_interval = beta or f.name in ("ema_decay", "lecam_decay")
        unit_interval = unit_interval or f.name.endswith(("dropout", "smoothing"))
        may_be_zero = f.name in ("warmup_steps", "seed", "keep") or f.name.endswith("_start")
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction)
            continue
        kinds = {
            "str": str,
            "int": nonneg_int if may_be_zero else positive_int,
            "float": float_in(0, 1 if unit_interval else math.inf, below_high=beta),
        }
        group.add_argument(
            flag, type=kinds[f.type], choices=choices.get(f.name), metavar=f.type.upper()
        )


# ----------------------------------------------------------------------------------------------
# 2. Files and weights: atomic writes, safetensors and torch files read safely, strict loading.


def write_atomic(path: str | os.PathLike, write) -> Path:
    """write(file) into a temporary file beside `path`, fsync, rename: a kill or a full disk leaves
    the previous file (or none), never half a one, and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # (torch.save reports a full disk as a RuntimeError)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        if path.parent.is_dir():
            reason += f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        raise UserError(f"cannot write {path} ({reason})") from None
    finally:
        with contextlib.suppress(OSError):  # (under a file that is no folder, there is no temp)
            tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    return write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file we or a model hub wrote; a damaged one (e.g. copied half-way) is one line."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); is the file complete?") from None


def run_file(path: str | os.PathLike) -> Path:
    """A training run's folder, named where a model is expected, stands for its export, or else
    its newest checkpoint; any other path for itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    files = [path / f"{kind}.pt" for kind in ("tokenizer", "vqgan", "generator")]
    files = [f for f in files if f.is_file()] or list_checkpoints(path)[-1:]
    return files[0] if files else path


def sha256_of(path: str | os.PathLike) -> str:
    """A model known by content: the sha256 of a file (as `sha256sum` prints it), of the file a run
    folder stands for, or of a folder's files' ones (an HF snapshot)."""
    path = run_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return hashlib.sha256("".join(sha256_of(p) for p in files).encode()).hexdigest()
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .safetensors file: an 8-byte little-endian header length n, n bytes of JSON {name: {dtype,
    shape, data_offsets: [begin, end]}} (+ an optional "__metadata__"), then the tensors' bytes."""
    buf = bytearray(Path(path).read_bytes())  # one copy of the file; the tensors are views into it
    try:
        n = int.from_bytes(buf[:8], "little")
        if len(buf) < 8 or 8 + n > len(buf):
            raise ValueError("header length points past the end of the file")
        header = json.loads(bytes(buf[8 : 8 + n]))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        tensors = {}
        for name, info in header.items():
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in [*shape, begin, end]):
                raise ValueError(f"tensor {name!r} has a negative or non-integer shape or offset")
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize or 8 + n + end > len(buf):
                raise ValueError(f"tensor {name!r} has inconsistent offsets")
            if count == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                offset = 8 + n + begin
                flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)
                tensors[name] = flat.reshape(shape)
        return tensors
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a valid .safetensors file ({e})") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A weights file: .safetensors through the reader above, anything else through torch.load(
    weights_only=True), which only rebuilds tensors and plain containers (no pickled code runs).
    A training run's folder stands for its export, or else its newest checkpoint."""
    path, named = run_file(path), Path(path)
    if path.is_dir():
        raise UserError(
            f"{path} is a folder without weights (no model.safetensors or pytorch_model.bin "
            "of a model hub, no export or ckpt_*.pt of a training run)"
        )
    if path != named:
        note(f"{named}: reading {path.name}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        # Memory-mapped where the format allows it: eight processes resuming from one checkpoint
        # share its pages instead of holding eight copies each.
        mapped = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as e:  # pickle errors, truncated zip files, foreign formats: say which
        first_line = (str(e).strip() or repr(e)).splitlines()[0]
        raise UserError(f"{path}: cannot read as a torch checkpoint ({first_line})") from None


def describe(obj) -> str:
    """What a weights file holds, in words: for the error that says it is not what a slot needs."""
    if isinstance(obj, dict) and isinstance(obj.get("kind"), str):
        what = "training checkpoint" if "argv" in obj else "export"
        return f"this project's {obj['kind']} {what}"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"a state dict of {len(obj)} tensors ({next(iter(obj))}, ...)"
    return f"a {type(obj).__name__}"


def tensors_only(obj, path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """`obj` if it is a bare state dict (names -> tensors), else an error saying what it is."""
    if describe(obj).startswith("a state dict"):
        return obj
    raise UserError(f"{path} is {describe(obj)}, not {what}")


def checkpoint_weights(ckpt: dict, kind: str, path: str | os.PathLike) -> tuple[dict, dict]:
    """(config dict, weights) of one of our files of `kind`: an export ({kind, config, model, ema})
    gives its EMA weights when it has them; a training checkpoint (ckpt_<step>.pt) its EMA's."""
    if ckpt.get("kind") != kind or "config" not in ckpt:
        raise UserError(f"{path} is {describe(ckpt)}, not a {kind}")
    if "argv" in ckpt:
        note(f"{path}: the EMA weights of this training checkpoint (step {ckpt['step']})")
        return ckpt["config"], ckpt["ema"]["shadow"]
    weights = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    return ckpt["config"], weights


def shapes(state_dict: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def guess_preset(state_dict: dict, presets: dict, build) -> str | None:
    """The preset whose model `build(config)` has exactly the keys and shapes of `state_dict`
    (the models are built on the `meta` device: no memory, no time)."""
    want = shapes(state_dict)
    with torch.device("meta"):
        for name, config in presets.items():
            if shapes(build(config).state_dict()) == want:
                return name
    return None


def load_official_weights(model: nn.Module, state_dict: dict, presets: dict | None = None) -> None:
    """Strict load: every key present, nothing extra, every shape equal; an error names the keys
    (and, given `presets` of the model's class, the preset the weights look like)."""
    have, want = shapes(state_dict), shapes(model.state_dict())
    problems = {
        "missing": [k for k in want if k not in have],
        "unexpected": [k for k in have if k not in want],
        "of the wrong shape (file vs model)": [
            f"{k} {v} vs {want[k]}" for k, v in have.items() if want.get(k, v) != v
        ],
    }
    if any(problems.values()):
        parts = []
        for what, keys in problems.items():
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:4])}{more}")
        message = "weights do not fit this model; " + "; ".join(parts)
        guess = guess_preset(state_dict, presets, type(model)) if presets else None
        if guess:
            message += f" - they look like preset {guess!r}"
        raise UserError(message)
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------
# 3. Images: any file to 8-bit RGB, the evaluation transform, pictures and PSNR.

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Any image file -> 8-bit RGB. PIL's convert("RGB") would clip 16/32-bit greyscale to white and
    drop alpha onto black, so: 16/32-bit values are scaled (x / 257), float (mode F) read as [0, 1],
    alpha composited on white."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated files fail here with a clear message
            if im.mode.startswith("I") or im.mode == "F":
                scale = 255.0 if im.mode == "F" else 1 / 257
                values = np.round(np.asarray(im, dtype=np.float64) * scale)
                im = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                white = Image.new("RGBA", im.size, "white")
                im = Image.alpha_composite(white, im.convert("RGBA"))
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, bicubic, the long side truncated: torchvision's Resize(size)."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """TiTok's evaluation transform (Resize + CenterCrop, torchvision's rounding)."""
    img = resize_shorter_side(img, size)
    left = int(round((img.size[0] - size) / 2))
    top = int(round((img.size[1] - size) / 2))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file as evaluation sees it: (3, size, size) in [0, 1]."""
    return to_tensor(resize_center_crop(open_rgb(path), size)).float() / 255.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [0, 1] (unclamped) -> uint8, clamped and rounded as TiTok's evaluation."""
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


def save_image(x: torch.Tensor, path: str | os.PathLike) -> None:
    """(3, H, W) in [0, 1] -> an image file (PNG unless the suffix names another format)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    pixels = to_uint8(x).permute(1, 2, 0).cpu().numpy()
    write_atomic(path, lambda f: Image.fromarray(pixels).save(f, format=fmt))


def image_grid(images: torch.Tensor, nrow: int, min_size: int = 128) -> torch.Tensor:
    """(N, 3, S, S) in [0, 1] -> one (3, H, W) picture, `nrow` images per row, a 1-px white frame
    around each; small images are upscaled (nearest) so a 32 px grid is easy to look at."""
    n, _, s, _ = images.shape
    rows = math.ceil(n / nrow)
    framed = F.pad(images.float().clamp(0, 1), (1, 1, 1, 1), value=1.0)  # (N, 3, S+2, S+2)
    blanks = framed.new_ones(rows * nrow - n, *framed.shape[1:])
    framed = torch.cat([framed, blanks]).view(rows, nrow, 3, s + 2, s + 2)
    grid = framed.permute(2, 0, 3, 1, 4).reshape(3, rows * (s + 2), nrow * (s + 2))
    if s < min_size:
        grid = F.interpolate(grid[None], scale_factor=min_size // s, mode="nearest")[0]
    return grid


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (the MSE over the whole batch)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10 * math.log10(1.0 / mse) if mse else math.inf


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls at full precision in the block, even where TF32 is on (GPUs)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16", none for "fp32"; discrete decisions switch it off themselves."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# Datasets: a source maps an index to a uint8 (3, S, S) image and its label.


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (MNIST's format, maybe gzipped): 0x0000 08 <ndim>, big-endian uint32 sizes."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[:3] != b"\0\0\x08":
            raise ValueError("bad magic number (expected uint8 idx data)")
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a readable idx file ({e})") from None


class IdxImages:
    """Greyscale idx images (Fashion-MNIST): 28 px padded to 32 with black (as LeNet did), grey
    repeated to RGB, resized (bicubic) for other sizes; labels from `*-labels-idx1-ubyte[.gz]`."""

    def __init__(self, files: list[Path], image_size: int):
        arrays = [read_idx(f) for f in files]
        if any(a.ndim != 3 for a in arrays):
            raise UserError(f"{files[0]}: expected (N, rows, cols) idx images")
        labels = []
        for f, images in zip(files, arrays):
            label_file = Path(str(f).replace("-images-idx3-", "-labels-idx1-"))
            if label_file.is_file():
                labels.append(read_idx(label_file).astype(np.int64))
            else:
                labels.append(np.zeros(len(images), np.int64))
        self.labels = np.concatenate(labels)
        self.images = np.concatenate(arrays)
        self.image_size = image_size
        self.description = f"{len(self.images)} idx images from {files[0].parent}"
        # What defines the data, for a resumed run to compare: the pixels and labels themselves.
        content = hashlib.sha256(self.images.tobytes())
        content.update(self.labels.tobytes())
        self.fingerprint = content.hexdigest()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:  # (a DataLoader's dataset)
        return self.load(i, None)

    def load(self, i: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i].copy())[None].float()
        x = F.pad(x, (2, 2, 2, 2))  # (1, 32, 32)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x[None], size=self.image_size, mode="bicubic", antialias=True)[0]
        x = x.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()
        return x, int(self.labels[i])


def list_images(root: Path) -> tuple[list[str], str]:
    """The image files under `root` (relative paths, sorted) and what defines them for a resumed
    run to compare: each file's name and size (one stat per file; 1.28 M files' bytes would take
    hours to read)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(
            f"--data {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
            "and no *-images-idx3-ubyte[.gz] files"
        )
    names, listing = [p.relative_to(root).as_posix() for p in files], hashlib.sha256()
    for p, name in zip(files, names):
        try:
            size = p.stat().st_size
        except OSError:  # (a dangling link: training skips it, as any unreadable file)
            size = -1
        listing.update(f"{name}\t{size}\n".encode())
    return names, listing.hexdigest()


class FolderImages:
    """root/<class>/<image> (ImageNet's layout; sorted classes -> labels). Training: the shorter
    side to image_size and a random crop (the official loader); else the evaluation transform.
    Process 0 lists the folder and sends the list to the others."""

    def __init__(
        self, root: Path, image_size: int, random_crop: bool = True, d: Dist | None = None
    ):
        names, self.fingerprint = from_rank0(lambda: list_images(root), d)
        self.files = [root / name for name in names]
        parts = [name.split("/") for name in names]
        class_names = sorted({q[0] for q in parts if len(q) > 1})
        classes = {c: i for i, c in enumerate(class_names)}
        self.labels = [classes[q[0]] if len(q) > 1 else 0 for q in parts]
        self.image_size, self.random_crop = image_size, random_crop
        self.description = f"{len(self.files)} images in {len(classes) or 1} classes under {root}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:  # (a DataLoader's dataset)
        return self.load(i, None)

    def load(self, i: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, int]:
        s, img = self.image_size, open_rgb(self.files[i])
        if rng is None or not self.random_crop:
            return to_tensor(resize_center_crop(img, s)), self.labels[i]
        img = resize_shorter_side(img, s)
        left = int(rng.integers(0, img.size[0] - s + 1))
        top = int(rng.integers(0, img.size[1] - s + 1))
        return to_tensor(img.crop((left, top, left + s, top + s))), self.labels[i]


def open_image_source(
    path: str | os.PathLike, image_size: int, random_crop: bool = True, d: Dist | None = None
) -> IdxImages | FolderImages:
    """--data: an idx(.gz) file, a folder of `*-images-idx3-ubyte[.gz]` files (all used), or
    images."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder")
    if path.is_file():
        idx = [path]
    else:
        idx = sorted(path.glob("*-images-idx3-ubyte.gz")) + sorted(path.glob("*-images-idx3-ubyte"))
    return IdxImages(idx, image_size) if idx else FolderImages(path, image_size, random_crop, d)


EVAL_SIZE = 1_000  # held-out images (the same split in train_gen.py): the reference of rFID, gFID


def split_heldout(n: int, n_heldout: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices, the held-out ones spread evenly (a class-sorted folder gives a
    mix of classes)."""
    if n_heldout > 0 and n < 2 * n_heldout:
        raise UserError(
            f"{n} images are too few to hold out {n_heldout} for evaluation (lower --eval-size)"
        )
    held = np.unique(np.linspace(0, n - 1, max(n_heldout, 0)).round().astype(np.int64))
    return np.setdiff1d(np.arange(n), held), held


# The training stream: a source becomes an endless stream whose order and augmentation depend on
# the position alone: any number of processes, any resume point, the same samples.


class TrainSet(torch.utils.data.Dataset):
    """Position p of an endless sample stream -> (uint8 image, label). Epoch e = p // n visits the
    training indices in the permutation seeded by (seed, e); sample p's augmentation is seeded by
    (seed, p)."""

    def __init__(self, source, indices: np.ndarray, seed: int, random_flip: bool = False):
        self.source, self.indices = source, np.asarray(indices)
        self.seed, self.random_flip = seed, random_flip
        self.epoch, self.permutation = -1, None
        self.unreadable = set()  # (named once per worker process)

    def index_at(self, pos: int) -> int:
        epoch, offset = divmod(pos, len(self.indices))
        if epoch != self.epoch:
            self.epoch = epoch
            rng = np.random.default_rng([self.seed, epoch])
            self.permutation = rng.permutation(len(self.indices))
        return int(self.indices[self.permutation[offset]])

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, int, int]:
        """(image, label, unreadable files skipped for it). A big folder may hold a few bad files:
        each is named on stderr and replaced by the next sample of the stream."""
        for skipped in range(100):
            rng = np.random.default_rng([self.seed, pos + skipped, 1])
            try:
                x, label = self.source.load(self.index_at(pos + skipped), rng)
                break
            except UserError as e:
                if str(e) not in self.unreadable:
                    sys.stderr.write(f"warning: skipped {e}\n")  # (one write: whole lines)
                self.unreadable.add(str(e))
        else:
            raise UserError("100 images in a row are unreadable; is --data an image folder?")
        if self.random_flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x, label, skipped


def step_batches(start: int, per_rank: int, world: int, rank: int):
    """A batch sampler: step s covers the positions start + s*G + [0, G), G = per_rank * world;
    rank r takes the r-th slice of them."""
    for pos in range(start + rank * per_rank, 2**62, per_rank * world):
        yield list(range(pos, pos + per_rank))


# ----------------------------------------------------------------------------------------------
# 4. torchrun: where this process sits, collectives that are no-ops in a world of one.


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed(device: torch.device | None = None, timeout_hours: float = 0.5):
    """The torchrun process group for a `with` block (NCCL on GPUs, gloo on CPUs; plain `python`:
    a world of one), destroyed when the block ends, also on an error, so no rank is left waiting."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = device or default_device()
    if device.type == "cuda":
        device = gpu_of_process(device, world, local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)  # (the RNG state saved in checkpoints is this GPU's)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions on GPUs,
        torch.backends.cudnn.allow_tf32 = True  # as the official code
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(hours=timeout_hours)
        bound = {"device_id": device} if device.type == "cuda" else {}  # NCCL knows its GPU
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **bound)
    # CPU runs repeat to the last digit: the default embedding backward (the codebook's gradient)
    # adds across threads in a varying order, and the nearest-code choice amplifies the difference.
    # GPUs keep their fast kernels.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(was_deterministic or device.type == "cpu")
    try:
        yield Dist(rank, world, device)
        if dist.is_initialized():  # leave together: no rank tears the group down under another
            try:
                dist.barrier()
            except RuntimeError:  # another rank failed (and said why there): stop here too
                sys.exit(1)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if dist.is_initialized():
            dist.destroy_process_group()


def gpu_of_process(device: torch.device, world: int, local_rank: int, gpus: int) -> torch.device:
    """The GPU of this process: under torchrun, local rank r takes GPU r % (the GPUs it sees), so a
    launcher that shows each process a single GPU gives it cuda:0; alone, the one asked for."""
    if world > 1:
        return torch.device("cuda", local_rank % gpus)
    return torch.device("cuda", device.index or 0)


@contextlib.contextmanager
def exclusive(folder: Path, d: Dist):
    """`folder` belongs to this job for the block: rank 0 holds a POSIX lock on folder/.lock, which
    the kernel drops when the process ends, however it ends (kill -9 included), so a leftover file
    blocks nothing (nor do data-loading processes forked from it: the lock is not inherited). A
    second job on the same folder is refused, naming the first. Every process must read what rank 0
    wrote there: on several nodes, a folder they do not share is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    lock, owner, token = None, "", float(secrets.randbits(52))
    if d.is_main:
        lock = open(folder / ".lock", "a+")
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.truncate(0)
            argv = " ".join(sys.argv)
            lock.write(f"process {os.getpid()} on {socket.gethostname()}: {argv}\n{token:.0f}")
            lock.flush()
            os.fsync(lock.fileno())  # (a network file system shows it to the other nodes)
        except (BlockingIOError, PermissionError):  # (EAGAIN or EACCES: another process holds it)
            lock.seek(0)
            owner = (lock.read().strip() or "another process").splitlines()[0]
            lock.close()
    first = [float(bool(owner)), token if d.is_main else 0.0]
    refused, token = world_sum(torch.tensor(first, dtype=torch.float64, device=d.device)).tolist()
    if refused:
        raise UserError(f"{folder} is in use by {owner}; wait for it, or use another folder")
    unseen = not d.is_main  # (closing a second handle would drop rank 0's lock: it reads none)
    with contextlib.suppress(OSError):
        unseen = unseen and f"{token:.0f}" not in (folder / ".lock").read_text()
    blind = world_sum(torch.tensor([float(unseen)], device=d.device)).item()
    if blind:
        raise UserError(
            f"{blind:.0f} of {d.world} processes do not see {folder / '.lock'} as process 0 wrote "
            "it: on several nodes, give a folder on a file system that all of them share"
        )
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over processes of a detached copy of `x` (for statistics)."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def world_mean(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean over processes of each statistic, as rounded floats, in one all-reduce."""
    names = sorted(stats)
    world = dist.get_world_size() if dist.is_initialized() else 1
    values = world_sum(torch.stack([stats[k].float() for k in names])) / world
    return {k: round(v, 6) for k, v in zip(names, values.tolist())}


def from_rank0(make, d: Dist | None):
    """make() in process 0 only; its result, or its UserError, goes to every process (one listing
    of a big folder, not one per process)."""
    box = [None]
    if d is None or d.is_main:
        try:
            box = [make()]
        except UserError as e:
            box = [e]
    if d is not None and d.world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


def run_in_chunks(
    folder: Path, fingerprint: dict, make_chunks, num_chunks: int, d: Dist, desc: str
) -> list[Path]:
    """Work split into chunks over the processes: chunk k is rank (k % world)'s, the chunks
    already written are skipped (a rerun resumes), and make_chunks(ks) yields this process's
    chunks ks in order, each written atomically as folder/<k>.npy. The folder records `fingerprint` (what the chunks depend on) before any chunk; chunks
    made with other values are refused, never mixed in. Returns the chunk files, once every
    process has written its own."""
    stamp, key = folder / "fingerprint.json", json.dumps(fingerprint, sort_keys=True)
    if stamp.exists() and stamp.read_bytes() != key.encode():
        made = json.loads(stamp.read_bytes() or b"{}")
        other = [
            f"{k} {str(made.get(k))[:16]}" for k in fingerprint if made.get(k) != fingerprint[k]
        ]
        raise UserError(
            f"{folder} holds parts made with {', '.join(other) or 'other values'}; run with "
            "those to finish them, or delete the folder"
        )
    files = [folder / f"{k:06d}.npy" for k in range(num_chunks)]
    todo = [k for k in range(num_chunks) if not files[k].exists()]  # before any process writes
    if d.is_main:
        write_atomic(stamp, lambda f: f.write(key.encode()))
        if len(todo) < num_chunks:
            print(f"resuming: {num_chunks - len(todo)}/{num_chunks} parts already in {folder}")
    barrier()
    mine = [k for k in todo if k % d.world == d.rank]
    processes = f"{d.world} process{'es' if d.world > 1 else ''}"
    chunks = zip(mine, make_chunks(mine))
    for k, chunk in tqdm(
        chunks, desc=f"{desc} ({processes})", total=len(mine), disable=not d.is_main
    ):
        write_atomic(files[k], lambda f: np.save(f, chunk))
    barrier()
    return files


# ----------------------------------------------------------------------------------------------
# 5. Checkpoints, exact resume and logs. A checkpoint holds all that a step depends on (weights,
#    EMA, optimisers, stream position, RNG states): a run killed at any moment (kill -9) and
#    resumed with --resume logs the losses of an uninterrupted run.


def save_checkpoint(path: str | os.PathLike, obj: dict) -> Path:
    return write_atomic(path, lambda f: torch.save(obj, f))


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """The ckpt_<step>.pt files in `out`, oldest first."""
    return sorted(p for p in Path(out).glob("ckpt_*.pt") if p.stem[5:].isdigit())


def save_step_checkpoint(out: Path, step: int, state: dict, keep: int, d: Dist) -> Path:
    """Rank 0 writes ckpt_<step>.pt and keeps the newest `keep`; the others wait for it."""
    path = out / f"ckpt_{step:08d}.pt"
    if d.is_main:
        save_checkpoint(path, state)
        if keep > 0:
            for old in list_checkpoints(out)[:-keep]:
                old.unlink()
    barrier()
    return path


def resume_from(
    out: Path, resume: bool, kinds: tuple[str, ...], d: Dist
) -> tuple[Path | None, dict | None]:
    """The newest checkpoint in --out (with --resume); without --resume, --out must hold none.
    Removes the temporary file of a save that was killed."""
    if d.is_main:
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    ckpts = list_checkpoints(out)
    if ckpts and not resume:
        raise UserError(
            f"{out} already holds checkpoints (newest {ckpts[-1].name}); pass --resume to "
            "continue that run or --out to start a new one"
        )
    if not (ckpts and resume):
        return None, None
    ckpt = read_checkpoint(ckpts[-1])
    if not (isinstance(ckpt, dict) and ckpt.get("kind") in kinds and "argv" in ckpt):
        raise UserError(f"{ckpts[-1]} is not a {' or '.join(kinds)} training checkpoint")
    return ckpts[-1], ckpt


def resolve(parser, argv: list[str], ckpt: dict | None, base, fixed: tuple[str, ...]) -> tuple:
    """(settings, the recipe `base(settings)` with the flags over it). A resumed run reads its first
    command line with the new flags on top (e.g. a longer --max-steps); the settings named in
    `fixed` decide its data and model and must not change."""
    if ckpt is not None:
        first, first_recipe = resolve(parser, ckpt["argv"], None, base, fixed)
        now, recipe = resolve(parser, ckpt["argv"] + argv, None, base, fixed)
        before = {**vars(first), **dataclasses.asdict(first_recipe)}
        after = {**vars(now), **dataclasses.asdict(recipe)}
        for k in fixed:
            if before.get(k) != after.get(k):
                raise UserError(
                    f"--resume: {now.out} was trained with "
                    f"--{k.replace('_', '-')} {before.get(k)}, "
                    f"not {after.get(k)} (resume with the same value, or use another --out)"
                )
        return now, recipe
    args = parser.parse_args(argv)
    args.data = str(Path(args.data).resolve())
    recipe = base(args)
    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(recipe)
        if f.name != "name" and getattr(args, f.name, None) is not None
    }
    return args, dataclasses.replace(recipe, **flags)


def run_is_finished(ckpt: dict | None, max_steps: int, export: Path, d: Dist) -> bool:
    """A finished run (last step, export written) resumed again does nothing, rewrites nothing."""
    done = ckpt is not None and int(ckpt["step"]) >= max_steps and export.is_file()
    if done and d.is_main:
        print(f"{export.parent} already holds the finished run ({export}); nothing to do")
    return done


def checkpoint(parts: dict, d: Dist, **values) -> dict:
    """The `parts`' state dicts, `values`, and every process's torch RNG state (a collective). Data
    order, augmentation, masks and dead-code restarts are seeded by position or step; the global
    RNG feeds only VAE noise and dropout."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    mine = {"cpu": torch.get_rng_state(), "cuda": cuda}
    rng = [mine] * d.world
    if d.world > 1:
        dist.all_gather_object(rng, mine)
    states = {k: p.state_dict() for k, p in parts.items() if p is not None}
    return {**states, **values, "world": d.world, "rng": rng}


def restore(ckpt: dict | None, parts: dict, d: Dist, seed: int) -> None:
    """Load the parts and continue the RNG streams; a new run seeds seed + rank (+ the step, when
    the number of processes changed)."""
    if ckpt is not None:
        for k, part in parts.items():
            if part is not None:
                part.load_state_dict(ckpt[k])
    if ckpt is not None and len(ckpt["rng"]) == d.world:
        torch.set_rng_state(ckpt["rng"][d.rank]["cpu"])
        if ckpt["rng"][d.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][d.rank]["cuda"])
    else:
        torch.manual_seed(seed + d.rank + (int(ckpt["step"]) if ckpt else 0))


def check_finite(values: dict[str, torch.Tensor], step: int, last_checkpoint: Path | None) -> None:
    """Stop every process at the first NaN/inf among `values` (a loss, a gradient norm), before
    the update; one all-reduce and one read by the host. Finite weights that gave it (|w| = 1e30)
    may be saved already: that ckpt_<step> becomes *.pt.nonfinite, so the newest checkpoint left
    is the last good one."""
    bad = torch.stack([~torch.isfinite(v.detach()).all() for v in values.values()]).float()
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    bad = bad.tolist()
    if not any(bad):
        return
    what = list(values)[bad.index(1.0)]
    value = values[what].detach().flatten()[0].item()
    if last_checkpoint is not None and int(last_checkpoint.stem[5:]) >= step:
        if int(os.environ.get("RANK", "0")) == 0:
            last_checkpoint.rename(last_checkpoint.with_suffix(".pt.nonfinite"))
        older = [p for p in list_checkpoints(last_checkpoint.parent) if int(p.stem[5:]) < step]
        last_checkpoint = older[-1] if older else None
    where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no good checkpoint"
    raise UserError(
        f"{what} is {value} at step {step}; stopped without saving "
        f"({where}; continue with --resume, e.g. with a lower --lr)"
    )


def open_log(path: Path, start: int, enabled: bool):
    """log.jsonl (rank 0), cut to the records up to `start`: it reads as one uninterrupted run. A
    last line cut short by a crash is dropped; a damaged line before it is an error."""
    if not enabled:
        return None
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    kept = []
    for i, line in enumerate(lines):
        try:
            if line.strip() and json.loads(line)["step"] <= start:
                kept.append(line.rstrip("\n") + "\n")
        except (ValueError, KeyError, TypeError):
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not a log record; repair or delete it")
    write_atomic(path, lambda f: f.write("".join(kept).encode()))
    return open(path, "a")


def write_log(log, record: dict) -> None:
    """One JSON line per logged step; a short line on the terminal."""
    if log is None:
        return
    log.write(json.dumps(record) + "\n")
    log.flush()
    shown = ("loss", "lr", "psnr", "images_per_s")
    values = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k in shown)
    print(f"step {record['step']}: {values}", flush=True)


# ----------------------------------------------------------------------------------------------
# 6. What both trainers take from the official recipe: the LR schedule, AdamW's groups, the EMA.


def lr_at(step: int, base_lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The official schedule: a linear warm-up from 0 (step 0 trains with lr 0), then half a
    cosine down to end_lr."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def recipe_lr(recipe, step: int) -> float:
    """The learning rate of a recipe (this file's or train_gen.py's) at `step`."""
    return lr_at(step, recipe.lr, recipe.end_lr, recipe.warmup_steps, recipe.max_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_adamw(
    named_params: list[tuple[str, nn.Parameter]],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
) -> torch.optim.AdamW:
    """AdamW with the official `exclude` rule: no weight decay on 1-D parameters, embeddings,
    latent and mask tokens."""
    words = ("bias", "ln", "norm", "embed", "latent_tokens", "mask_token", "gamma")
    no_decay = [p.ndim < 2 or any(w in n for w in words) for n, p in named_params]
    decayed = [p for (_, p), nd in zip(named_params, no_decay) if not nd]
    not_decayed = [p for (_, p), nd in zip(named_params, no_decay) if nd]
    groups = [
        {"params": not_decayed, "weight_decay": 0.0},
        {"params": decayed, "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


class EMA:
    """An fp32 moving average of a model's state dict, evaluated and exported. Its decay warms up
    as (1 + s) / (10 + s), s = updates - 1, capped at `decay`: it forgets the init quickly."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay, self.step = decay, 0
        self.shadow = {}
        for k, v in model.state_dict().items():
            v = v.detach().clone()
            self.shadow[k] = v.float() if v.is_floating_point() else v

    def decay_at(self, step: int) -> float:
        return 0.0 if step <= 1 else min(step / (9 + step), self.decay)  # s = step - 1

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.step += 1
        d = self.decay_at(self.step)
        state = model.state_dict()
        floats = [k for k, v in state.items() if v.is_floating_point()]
        shadow, current = [self.shadow[k] for k in floats], [state[k].float() for k in floats]
        torch._foreach_lerp_(
            shadow, current, 1.0 - d
        )  # shadow = d * shadow + (1 - d) * v, all at once
        for k in state.keys() - set(floats):
            self.shadow[k].copy_(state[k])

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}
        self.step = state["step"]

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """The averaged weights in `model` for a while (evaluation), then its own again."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)
