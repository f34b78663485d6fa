"""Every bad input of the issue "No silent wrong results" ends in one clear line (exit status != 0,
no traceback) or in the correct result, and leaves earlier output as it was. The sections follow
the issue: 1 silent wrong results, 2 misleading messages, 3 lost or duplicated output, 4 tracebacks
where one line belongs.

The stage programs run in-process through their command lines (`main(argv)`, as `python X.py argv`
would; one real process at the end shows the two exit alike), on tiny random models. Kill -9 and
torchrun faults are tested beside each stage (test_train_tok, test_train_gen, test_sample), and so is
a --ckpt file replaced between two `sample.py --npz` runs (test_sample).
"""

import errno
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Run, image_folder, one_line_error, run, snapshot
from PIL import Image

import tokenizer as T
import train_tok

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

ROOT = Path(__file__).resolve().parents[1]


def fill(argv, paths: dict) -> list[str]:
    """Table argv with "{name}" placeholders -> the paths of the `files` fixture (and `out`)."""
    return [str(a).format(**paths) for a in argv]


def write_safetensors(path: Path, header, data: bytes = b"") -> Path:
    """A .safetensors file with this (possibly malformed) JSON header."""
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def train_args(cli: str, files: dict) -> list:
    """A tiny, fast run of train_tok or train_gen (--out and --max-steps are given apart)."""
    return {
        "train_tok": ["--batch-size", 2, "--eval-size", 0, "--disc-weight", 0],
        "train_gen": ["--tokens", files["tokens"], "--batch-size", 4, "--eval-every", 100],
    }[cli]


class FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def disk_full(monkeypatch, name: str) -> None:
    """From now on the disk is full for files whose name contains `name` (the file itself, or a
    temporary file beside it named after it): opened for writing with open() or io.open() (pathlib,
    zipfile, PIL and numpy use one of them), they take no byte."""
    real_open = io.open

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if set(mode) & set("wax+") and name in os.path.basename(str(file)) else f

    monkeypatch.setattr("builtins.open", full_open)
    monkeypatch.setattr(io, "open", full_open)


SPACE = re.compile(r"\d+(\.\d+)? ?([KMGT]i?B|bytes)")  # "how much space" in a disk-full message


@pytest.fixture(scope="module")
def files(tmp_path_factory, random_weights, helpers) -> dict:
    """The inputs of the tests, made once: tiny models, an image, and bad files of every kind."""
    d = tmp_path_factory.mktemp("inputs")
    f = {"inception": random_weights}
    f["tok"] = helpers.save_tokenizer(helpers.tiny_tokenizer(), d / "tok.pt")
    f["tok512"] = helpers.save_tokenizer(helpers.tiny_tokenizer(codebook_size=512), d / "tok512.pt")
    torch.manual_seed(5)  # another tokenizer of the same architecture
    f["tok_b"] = helpers.save_tokenizer(T.TiTok(T.PRESETS["tiny"]).eval(), d / "tok_b.pt")
    f["gen"] = helpers.save_generator(d / "gen.pt")
    f["tokens"] = helpers.make_tokens(d / "tokens")
    f["tokens_b"] = helpers.make_tokens(
        d / "tokens_b", seed=1
    )  # another data set of the same shape
    f["tokens512"] = helpers.make_tokens(d / "tokens512", codebook=512)
    f["tokens_label10"] = helpers.make_tokens(d / "tokens_label10", label_max=10)
    torch.save(torch.load(f["tok"], weights_only=True)["model"], f.setdefault("raw", d / "raw.pt"))
    torch.save(
        {"kind": "generator", "config": {}, "model": {}}, f.setdefault("genkind", d / "genkind.pt")
    )
    (f.setdefault("junk", d / "junk.pt")).write_bytes(b"\x00garbage" * 100)
    torch.save(
        [1, 2, 3], f.setdefault("a_list", d / "list.pt")
    )  # a readable checkpoint that holds no weights
    (f.setdefault("file", d / "file.txt")).write_text("an existing file")
    for name in ("empty", "one", "notes"):
        (f.setdefault(name, d / name)).mkdir()
    # images
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(f.setdefault("img", d / "img.png"))
    Image.new("RGB", (8, 8)).save(d / "one" / "a.png")
    (d / "notes" / "readme.txt").write_text("no images here")
    (f.setdefault("text_png", d / "text.png")).write_text("hello")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        d / "full.png"
    )
    (f.setdefault("trunc_png", d / "trunc.png")).write_bytes((d / "full.png").read_bytes()[:3000])
    (f.setdefault("pngs", d / "pngs")).mkdir()  # three images, the second unreadable
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(d / "pngs" / f"{i:03d}.png")
    (d / "pngs" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # safetensors headers: a torn file, a JSON list, negative shapes / offsets, a float shape, a bad dtype
    f["torn"] = d / "torn.safetensors"
    f["torn"].write_bytes((10**6).to_bytes(8, "little") + b"{}")
    f["st_list"] = write_safetensors(d / "list.safetensors", [1, 2])
    f["st_negshape"] = write_safetensors(
        d / "negshape.safetensors",
        {"a": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}},
        bytes(8),
    )
    f["st_negoffset"] = write_safetensors(
        d / "negoffset.safetensors",
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
        bytes(8),
    )
    f["st_floatshape"] = write_safetensors(
        d / "floatshape.safetensors",
        {"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}},
        bytes(8),
    )
    f["st_dtype"] = write_safetensors(
        d / "dtype.safetensors",
        {"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}},
        bytes(8),
    )
    # fid inputs
    mixed = np.empty(2, dtype=object)
    mixed[0], mixed[1] = np.zeros((8, 8, 3), np.uint8), np.zeros((9, 9, 3), np.uint8)
    np.savez(f.setdefault("mixed", d / "mixed.npz"), arr_0=mixed)
    np.savez(f.setdefault("wrongkey", d / "wrongkey.npz"), images=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(f.setdefault("musonly", d / "musonly.npz"), mu=np.zeros(8))
    np.savez(f.setdefault("badshape", d / "badshape.npz"), mu=np.zeros(8), sigma=np.zeros((8, 7)))
    np.savez(f.setdefault("float", d / "float.npz"), arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(f.setdefault("two", d / "two.npz"), arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(f.setdefault("big", d / "big.npz"), arr_0=np.zeros((2, 48, 48, 3), np.uint8))
    np.savez(f.setdefault("good", d / "good.npz"), mu=np.zeros(8), sigma=np.eye(8))
    np.savez(f.setdefault("tf1", d / "tf1.npz"), mu=np.zeros(8), sigma=np.eye(8), n=2, resize="tf1")
    np.savez(f.setdefault("nan", d / "nan.npz"), mu=np.full(8, np.nan), sigma=np.eye(8))
    np.savez(f.setdefault("zero_cov", d / "zero_cov.npz"), mu=np.zeros(8), sigma=np.zeros((8, 8)))
    np.savez(
        f.setdefault("rand", d / "rand.npz"),
        arr_0=np.random.default_rng(1).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8),
    )
    (f.setdefault("trunc_stats", d / "trunc_stats.npz")).write_bytes(f["good"].read_bytes()[:200])
    (f.setdefault("junk_npz", d / "junk.npz")).write_bytes(b"PK\x03\x04 not a zip")
    (f.setdefault("junk_pth", d / "junk.pth")).write_bytes(b"garbage" * 10)
    return {k: Path(v) for k, v in f.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, files) -> Path:
    """A finished 1-step run of each trainer, in <folder>/train_tok and <folder>/train_gen."""
    d = tmp_path_factory.mktemp("trained")
    for cli in ("train_tok", "train_gen"):
        r = run(cli, "--out", d / cli, "--max-steps", 1, *train_args(cli, files))
        assert r.code == 0, r.err
    return d


def copy_run(trained: Path, cli: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained / cli, tmp_path / cli))


# ==================================================================================================
# 1. Silent wrong results
# ==================================================================================================

FLOAT_FLAGS = {
    "sample": ["--guidance-scale", "--guidance-pow", "--temperature", "--randomize-temperature"],
    "train_tok": [
        "--lr",
        "--end-lr",
        "--beta1",
        "--beta2",
        "--weight-decay",
        "--grad-clip",
        "--ema-decay",
        "--reconstruction-weight",
        "--quantizer-weight",
        "--kl-weight",
        "--perceptual-weight",
        "--disc-weight",
        "--disc-lr",
        "--lecam-weight",
        "--lecam-decay",
    ],
    "train_gen": [
        "--lr",
        "--end-lr",
        "--beta1",
        "--beta2",
        "--weight-decay",
        "--grad-clip",
        "--ema-decay",
        "--label-smoothing",
        "--unmasked-weight",
        "--label-dropout",
        "--dropout",
    ],
}
OUT_OF_RANGE = [
    ("sample", "--temperature", "0"),
    ("sample", "--guidance-scale", "1e9"),
    ("train_tok", "--beta1", "1.5"),
    ("train_tok", "--lecam-decay", "2"),
    ("train_tok", "--ema-decay", "1.1"),
    ("train_gen", "--dropout", "1.5"),
    ("train_gen", "--beta2", "2"),
    pytest.param("train_tok", "--beta1", "1"),
    pytest.param("train_tok", "--beta2", "1"),
    pytest.param("train_gen", "--beta1", "1"),
    pytest.param("train_gen", "--label-smoothing", "2"),
    pytest.param("train_gen", "--label-dropout", "2"),
]


def float_flag_run(cli: str, files: dict, tmp_path: Path) -> list:
    """The rest of a command line that would run (briefly) were the flag accepted."""
    return {
        "sample": [
            "--ckpt",
            files["gen"],
            "--tokenizer",
            files["tok"],
            "--classes",
            0,
            "--per-class",
            1,
            "--out",
            tmp_path / "g.png",
        ],
        "train_tok": ["--out", tmp_path / "o", "--max-steps", 1, *train_args("train_tok", files)],
        "train_gen": ["--out", tmp_path / "o", "--max-steps", 1, *train_args("train_gen", files)],
    }[cli]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
@pytest.mark.parametrize(
    "cli, flag", [(cli, flag) for cli, flags in FLOAT_FLAGS.items() for flag in flags]
)
def test_float_flags_must_be_finite(cli, flag, value, files, tmp_path):
    """`--guidance-scale nan` sampled every token id 0 and exited 0; every float flag of every script."""
    one_line_error(run(cli, *float_flag_run(cli, files, tmp_path), flag, value), flag, value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("cli, flag, value", OUT_OF_RANGE)
def test_float_flags_must_be_in_range(cli, flag, value, files, tmp_path):
    one_line_error(run(cli, *float_flag_run(cli, files, tmp_path), flag, value), flag)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "cli, argv",
    [
        (
            "train_tok",
            ["--out", "{out}/o", "--max-steps", 1, "--batch-size", 2, "--disc-weight", 0],
        ),
        (
            "train_gen",
            ["--out", "{out}/o", "--max-steps", 1, "--tokens", "{tokens}", "--batch-size", 4],
        ),
        ("train_gen", ["tokenize", "--tokenizer", "{tok}", "--data", "{one}", "--out", "{out}/o"]),
    ],
)
def test_negative_eval_size_is_refused(cli, argv, files, tmp_path):
    one_line_error(
        run(cli, *fill(argv, {**files, "out": tmp_path}), "--eval-size", -5), "--eval-size"
    )


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, files) -> Path:
    """12 images (<folder>/imgs) and their tokens by tokenizer `tok` (<folder>/tokens)."""
    d = tmp_path_factory.mktemp("tokenized")
    r = run(
        "train_gen",
        "tokenize",
        "--tokenizer",
        files["tok"],
        "--data",
        image_folder(d / "imgs"),
        "--out",
        d / "tokens",
        "--eval-size",
        2,
    )
    assert r.code == 0, r.err
    return d


def tokens_by(tok: Path, data: Path, out: Path) -> np.ndarray:
    """The token ids a fresh `tokenize` with `tok` makes of `data`."""
    assert (
        run(
            "train_gen",
            "tokenize",
            "--tokenizer",
            tok,
            "--data",
            data,
            "--out",
            out,
            "--eval-size",
            2,
        ).code
        == 0
    )
    return np.load(out / "tokens.npy")


def test_train_gen_refuses_tokens_of_another_tokenizer(tokenized, files, tmp_path):
    """`--tokens A --tokenizer B` trained on tokens that another tokenizer made, and exited 0."""
    before = snapshot(tokenized)
    one_line_error(
        run(
            "train_gen",
            "--tokens",
            tokenized / "tokens",
            "--tokenizer",
            files["tok_b"],
            "--out",
            tmp_path / "o",
            "--max-steps",
            1,
        ),
        "another tokenizer",
    )
    assert snapshot(tokenized) == before and not list(tmp_path.rglob("*.pt"))


def test_tokenize_does_not_reuse_tokens_of_another_tokenizer(tokenized, files, tmp_path):
    out = Path(shutil.copytree(tokenized / "tokens", tmp_path / "tokens"))
    before = snapshot(out)
    r = run(
        "train_gen",
        "tokenize",
        "--tokenizer",
        files["tok_b"],
        "--data",
        tokenized / "imgs",
        "--out",
        out,
        "--eval-size",
        2,
    )
    if r.code == 0:  # re-made with this tokenizer...
        assert np.array_equal(
            np.load(out / "tokens.npy"),
            tokens_by(files["tok_b"], tokenized / "imgs", tmp_path / "b"),
        )
    else:  # ...or refused, the tokens kept
        one_line_error(r, "tokenizer")
        assert snapshot(out) == before


def test_tokenize_resumed_with_another_tokenizer_does_not_mix(files, tmp_path):
    imgs = image_folder(tmp_path / "imgs")
    last = sorted(imgs.rglob("*.png"))[
        -1
    ]  # a held-out image: tokenised last, after the training chunks
    good, out = last.read_bytes(), tmp_path / "tokens"
    last.write_bytes(b"not an image")
    args = ["--data", imgs, "--out", out, "--eval-size", 2]
    one_line_error(
        run("train_gen", "tokenize", "--tokenizer", files["tok"], *args), "not a readable image"
    )
    assert any(out.rglob("*")), "the interrupted run kept no finished work: nothing to mix"
    last.write_bytes(good)
    r = run("train_gen", "tokenize", "--tokenizer", files["tok_b"], *args)
    if r.code == 0:
        assert np.array_equal(
            np.load(out / "tokens.npy"), tokens_by(files["tok_b"], imgs, tmp_path / "b")
        )
    else:
        one_line_error(r, "tokenizer")


def test_sample_npz_of_a_replaced_tokenizer_is_refused(files, tmp_path):
    """Models by content: a finished .npz is not "nothing to do" once the tokenizer file changed."""
    tok = Path(shutil.copy(files["tok"], tmp_path / "tok.pt"))
    argv = [
        "--ckpt",
        files["gen"],
        "--tokenizer",
        tok,
        "--num-samples",
        2,
        "--batch-size",
        2,
        "--npz",
        tmp_path / "s.npz",
    ]
    assert run("sample", *argv).code == 0
    shutil.copy(files["tok_b"], tok)  # the same architecture, other weights, at the same path
    before = snapshot(tmp_path)
    one_line_error(run("sample", *argv), "s.npz", "another generator/tokenizer")
    assert snapshot(tmp_path) == before


def test_fid_refuses_statistics_of_other_inception_weights(files, tmp_path):
    sd = torch.load(files["inception"], map_location="cpu", weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point() and k.endswith("conv.weight"))
    sd[key] = sd[key] * 1.5
    torch.save(sd, tmp_path / "other.pth")
    r = run(
        "fid",
        "stats",
        files["rand"],
        "--out",
        tmp_path / "ref.npz",
        "--inception",
        files["inception"],
    )
    assert r.code == 0, r.err
    one_line_error(
        run(
            "fid",
            files["rand"],
            tmp_path / "ref.npz",
            "--inception",
            tmp_path / "other.pth",
            "--splits",
            1,
        ),
        "ref.npz",
    )


def test_fid_of_identical_images_is_zero(files):
    r = run("fid", files["zero_cov"], files["zero_cov"])
    if r.code == 0:
        assert "fid: 0.0000" in r.out, r.out
    else:
        one_line_error(r, "zero_cov.npz")


GREY = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # (32, 32): 0, 8, ..., 248 along x
RIGHT = np.arange(32) >= 16  # transparent half in the alpha cases


def mode_image(mode: str) -> tuple[Image.Image, np.ndarray]:
    """A 32 x 32 image in PIL `mode` and the 8-bit RGB a viewer shows for it (transparency on white)."""
    want = np.repeat(GREY[..., None], 3, axis=2)

    def white(where):
        return np.where(where[..., None], 255, want).astype(np.uint8)

    if mode in ("I;16", "I"):
        img = Image.fromarray(GREY.astype(np.uint16) * 257)  # mode I;16, values 0..65535
        return (img if mode == "I;16" else img.convert("I")), want
    if mode == "F":
        return Image.fromarray(GREY.astype(np.float32) / 255, "F"), want
    if mode == "RGBA":
        return Image.fromarray(
            np.dstack([want, np.where(RIGHT, 0, 255).astype(np.uint8)[None].repeat(32, 0)])
        ), white(np.broadcast_to(RIGHT, GREY.shape))
    if mode == "LA":
        return Image.fromarray(
            np.dstack([GREY, np.where(RIGHT, 0, 255).astype(np.uint8)[None].repeat(32, 0)]), "LA"
        ), white(np.broadcast_to(RIGHT, GREY.shape))
    if mode == "P+transparency":
        img = Image.fromarray(GREY, "L").convert("P")
        img.info["transparency"] = img.getpixel((0, 0))  # the black column
        return img, white(GREY == 0)
    if mode == "1":
        return Image.fromarray(GREY >= 128), np.repeat(
            np.where(GREY >= 128, 255, 0).astype(np.uint8)[..., None], 3, 2
        )
    return Image.fromarray(want, "RGB").convert(mode), want  # L, CMYK, RGB


@pytest.mark.parametrize(
    "mode", ["I;16", "I", "F", "RGBA", "LA", "P+transparency", "L", "1", "CMYK", "RGB"]
)
def test_every_image_mode_is_converted_as_a_viewer_shows_it(mode, files, tmp_path):
    """16-bit greyscale PNGs (I;16) were clipped to white. `reconstruct` draws the preprocessed input
    (here the image itself: 32 px, the tiny tokenizer's size) left of its reconstruction."""
    img, want = mode_image(mode)
    path = tmp_path / ("x.tif" if mode in ("F", "CMYK", "I") else "x.png")
    img.save(path)
    r = run("tokenizer", "reconstruct", path, "--ckpt", files["tok"], "--out", tmp_path / "out")
    assert r.code == 0, r.err
    got = np.asarray(Image.open(tmp_path / "out" / "x_side_by_side.png").convert("RGB"))[:, :32]
    assert np.abs(got.astype(int) - want).max() <= 1, (mode, got[0, ::4, 0], want[0, ::4, 0])


@pytest.mark.parametrize(
    "cli, flag, value, old",
    [
        ("train_tok", "--seed", 1, 42),
        ("train_tok", "--eval-size", 5, 0),
        ("train_tok", "--recipe", "stage1", "single"),
        ("train_tok", "--preset", "titok_s128", "tiny"),
        ("train_gen", "--seed", 1, 42),
        ("train_gen", "--eval-size", 5, 1000),
        pytest.param("train_gen", "--tokens", "{tokens_b}", "{tokens}"),
    ],
)
def test_resume_refuses_changed_settings(cli, flag, value, old, trained, files, tmp_path):
    """--resume accepted a changed --seed, --eval-size or --tokens: refused, in one line naming the
    flag (the data and the tokens by content: tests/test_faults.py)."""
    out = copy_run(trained, cli, tmp_path)
    before = snapshot(out)
    value, old = fill([value, old], files)
    one_line_error(
        run(cli, "--out", out, "--resume", "--max-steps", 2, *train_args(cli, files), flag, value),
        "are not the tokens" if flag == "--tokens" else f"{flag} {old}",
    )
    assert snapshot(out) == before


def test_resume_refuses_a_changed_teacher(tmp_path):
    """main.sh resumes every stage: a finished stage 1 whose VQGAN was retrained since said "nothing to do" and kept
    the codes of the old teacher (two models mixed). Refused, in one line naming --vqgan."""
    vq = tmp_path / "vqgan.pt"
    args = [
        "--recipe",
        "stage1",
        "--vqgan",
        vq,
        "--out",
        tmp_path / "s1",
        "--max-steps",
        1,
        "--resume",
        "--batch-size",
        2,
        "--eval-size",
        0,
    ]
    for seed in (0, 1):  # the teacher, then another one at the same path
        torch.manual_seed(seed)
        torch.save(T.MaskGITVQGAN(train_tok.TINY_VQGAN).state_dict(), vq)
        if seed == 0:
            assert run("train_tok", *args).code == 0
            before = snapshot(tmp_path / "s1")
    one_line_error(run("train_tok", *args), "--vqgan", "differ")
    assert snapshot(tmp_path / "s1") == before


@pytest.mark.parametrize("cli", ["train_tok", "train_gen"])
def test_a_finished_run_is_not_overwritten_without_resume(cli, trained, files, tmp_path):
    out = copy_run(trained, cli, tmp_path)
    before = snapshot(out)
    one_line_error(run(cli, "--out", out, "--max-steps", 2, *train_args(cli, files)), "--resume")
    assert snapshot(out) == before


# ==================================================================================================
# 2. Misleading messages
# ==================================================================================================


def nan_run(cli: str, files: dict, out: Path, lr: str = "1e30") -> list:
    """With lr 1e30 the first update leaves weights of |w| ~ 1e30 (saved at step 1): the next loss is NaN."""
    return [
        "--out",
        out,
        "--max-steps",
        5,
        "--save-every",
        1,
        "--log-every",
        1,
        "--warmup-steps",
        0,
        "--lr",
        lr,
        *train_args(cli, files),
    ]


@pytest.mark.parametrize("cli", ["train_tok", "train_gen"])
def test_nan_stops_in_one_line_and_saves_nothing_after(cli, files, tmp_path):
    message = one_line_error(run(cli, *nan_run(cli, files, tmp_path / "o")), "step", "--resume")
    assert re.search(r"\b(nan|inf)\b", message), message
    assert (
        not list((tmp_path / "o").glob("*[2-9].pt"))
        and not (tmp_path / "o" / "summary.json").exists()
    )


@pytest.mark.parametrize("cli", ["train_tok", "train_gen"])
def test_nan_stop_keeps_the_last_checkpoint_with_finite_weights_and_loss(cli, files, tmp_path):
    out = tmp_path / "o"
    message = one_line_error(run(cli, *nan_run(cli, files, out)))
    if named := re.search(r"(\S+\.pt)\b", message):
        assert Path(named.group(1)).is_file(), message
    r = run(cli, *nan_run(cli, files, out, lr="1e-3"), "--resume")
    assert r.code == 0, r.err  # "continue with --resume, e.g. with a lower --lr" works


def test_encode_names_the_file_it_writes(files, tmp_path):
    """`encode --out X` said it wrote X where numpy wrote X.npy."""
    r = run("tokenizer", "encode", files["img"], "--ckpt", files["tok"], "--out", tmp_path / "ids")
    assert r.code == 0, r.err
    wrote = re.search(r"wrote (\S+)", r.out)
    assert wrote and list(tmp_path.iterdir()) == [Path(wrote.group(1))], r.out
    assert np.load(wrote.group(1)).shape == (1, 32)


# ==================================================================================================
# 3. Lost or duplicated output
# ==================================================================================================


@pytest.mark.parametrize("cli", ["train_tok", "train_gen"])
def test_a_restart_from_step_0_starts_the_log_afresh(cli, files, tmp_path):
    """A run killed before its first checkpoint left log records; the restart must not append to them."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "loss": 99.0}\n')
    r = run(
        cli, "--out", out, "--resume", "--max-steps", 1, "--log-every", 1, *train_args(cli, files)
    )
    assert r.code == 0, r.err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1] and log[0]["loss"] != 99.0


@pytest.mark.parametrize("cli", ["train_tok", "train_gen"])
def test_resume_removes_a_killed_saves_temporary_file(cli, trained, files, tmp_path):
    """A kill -9 mid-save leaves the temporary file (named as the savers name theirs)."""
    out = copy_run(trained, cli, tmp_path)
    (out / ".ckpt_00000002.pt.4242.tmp").write_bytes(b"half a checkpoint")
    r = run(cli, "--out", out, "--resume", "--max-steps", 2, *train_args(cli, files))
    assert r.code == 0, r.err
    assert (out / "ckpt_00000002.pt").is_file() and not [
        p for p in out.rglob("*") if "tmp" in p.name
    ]


@pytest.mark.parametrize("names", [("a.jpg", "a.png"), ("a.png", "sub/a.png")])
def test_reconstruct_refuses_two_images_with_one_output_name(names, files, tmp_path):
    """`reconstruct a.jpg a.png` wrote both to a_recon.png."""
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_recon.png").write_bytes(b"earlier output")
    before = snapshot(tmp_path)
    one_line_error(
        run(
            "tokenizer",
            "reconstruct",
            *[tmp_path / n for n in names],
            "--ckpt",
            files["tok"],
            "--out",
            tmp_path / "out",
        ),
        "stem",
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("marker, smoke", [("smoke", "0"), ("full", "1")])
def test_main_sh_refuses_to_mix_smoke_and_full_runs(marker, smoke, tmp_path):
    """A full main.sh after a SMOKE=1 run in the same OUT kept the 3-step models. `python` is a stub
    here: were the run not refused before its first stage, the stub would record it."""
    out, stub = tmp_path / "out", tmp_path / "bin" / "python"
    (out / "tok").mkdir(parents=True)
    (out / "main_mode").write_text(marker + "\n")
    (out / "tok" / "tokenizer.pt").write_bytes(b"the 3-step model")
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "called"}\nexit 97\n')
    stub.chmod(0o755)
    before = snapshot(out)
    r = subprocess.run(
        ["bash", str(ROOT / "main.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "OUT": str(out),
            "SMOKE": smoke,
            "PATH": f"{stub.parent}:{os.environ['PATH']}",
        },
    )
    one_line_error(Run(r.returncode, r.stdout, r.stderr), str(out), marker)
    assert not (tmp_path / "called").exists() and snapshot(out) == before


# ==================================================================================================
# 4. Tracebacks where one line belongs
# ==================================================================================================

TRAIN_TOK = ["--out", "{out}/o", "--max-steps", 1, "--batch-size", 2, "--eval-size", 0]
TRAIN_GEN = ["--tokens", "{tokens}", "--out", "{out}/o", "--max-steps", 1, "--batch-size", 4]
TOKENIZE = ["tokenize", "--tokenizer", "{tok}", "--data", "{one}", "--eval-size", 0]
SAMPLE = ["--ckpt", "{gen}", "--tokenizer", "{tok}"]
GRID = [*SAMPLE, "--out", "{out}/g.png"]
RECON = ["reconstruct", "{img}", "--out", "{out}/o"]


def named(rows: list) -> list:
    """Table rows (script, argv, ...) -> pytest params named by the script and the argv past the
    common part (TRAIN_TOK, GRID...)."""
    params = []
    for row in rows:
        values, marks = (row.values, row.marks) if hasattr(row, "values") else (row, ())
        cli, argv = values[:2]
        for label, common in (
            ("", TRAIN_TOK),
            ("", TRAIN_GEN),
            ("tokenize", TOKENIZE),
            ("", GRID),
            ("", SAMPLE),
            ("reconstruct", RECON),
        ):
            if argv[: len(common)] == common:
                argv = [label, *argv[len(common) :]]
                break
        name = " ".join(str(a) for a in [cli, *argv] if str(a)).replace("{", "").replace("}", "")
        params.append(pytest.param(*values, marks=marks, id=name))
    return params


ONE_LINE_ERRORS = [  # (script, argv, words of the message)
    # tokenizer.py
    (
        "tokenizer",
        ["encode", "{img}", "--ckpt", "{tok}", "--out", "{out}/ids", "--batch-size", 0],
        ["--batch-size"],
    ),
    (
        "tokenizer",
        ["encode", "{img}", "--ckpt", "{tok}", "--out", "{out}/ids", "--batch-size", -3],
        ["--batch-size"],
    ),
    pytest.param(
        "tokenizer", [*RECON, "--ckpt", "{tok}", "--device", "cuda"], ["CUDA"], marks=NO_GPU
    ),
    (
        "tokenizer",
        ["reconstruct", "{out}/nope.png", "--ckpt", "{tok}", "--out", "{out}/o"],
        ["nope.png", "not found"],
    ),
    (
        "tokenizer",
        ["reconstruct", "{text_png}", "--ckpt", "{tok}", "--out", "{out}/o"],
        ["text.png", "not a readable image"],
    ),
    (
        "tokenizer",
        ["reconstruct", "{trunc_png}", "--ckpt", "{tok}", "--out", "{out}/o"],
        ["trunc.png", "not a readable"],
    ),
    ("tokenizer", [*RECON, "--ckpt", "{genkind}"], ["genkind.pt", "not a tokenizer"]),
    (
        "tokenizer",
        [*RECON, "--ckpt", "{raw}", "--preset", "titok_s128"],
        ["look like preset 'tiny'"],
    ),
    ("tokenizer", [*RECON, "--ckpt", "{junk}"], ["junk.pt", "cannot read"]),
    ("tokenizer", [*RECON, "--ckpt", "{out}/nope.pt"], ["nope.pt", "not found"]),
    ("tokenizer", [*RECON, "--ckpt", "{torn}"], ["torn.safetensors", "not a valid .safetensors"]),
    (
        "tokenizer",
        [*RECON, "--ckpt", "{st_list}"],
        ["list.safetensors", "not a valid .safetensors"],
    ),
    (
        "tokenizer",
        [*RECON, "--ckpt", "{st_negshape}"],
        ["negshape.safetensors", "not a valid .safetensors"],
    ),
    (
        "tokenizer",
        [*RECON, "--ckpt", "{st_negoffset}"],
        ["negoffset.safetensors", "not a valid .safetensors"],
    ),
    (
        "tokenizer",
        [*RECON, "--ckpt", "{st_floatshape}"],
        ["floatshape.safetensors", "not a valid .safetensors"],
    ),
    (
        "tokenizer",
        [*RECON, "--ckpt", "{st_dtype}"],
        ["dtype.safetensors", "not a valid .safetensors"],
    ),
    ("tokenizer", ["reconstruct", "{img}", "--ckpt", "{tok}", "--out", "{file}"], ["file.txt"]),
    ("tokenizer", ["encode", "{img}", "--ckpt", "{tok}", "--out", "{file}/ids.npy"], ["file.txt"]),
    # sample.py
    ("sample", [*GRID, "--classes", 3, 10], ["[10] are out of range"]),
    ("sample", [*GRID, "--classes", -1], ["out of range: this generator knows classes 0..9"]),
    (
        "sample",
        ["--ckpt", "{gen}", "--tokenizer", "{tok512}", "--out", "{out}/g.png"],
        ["codebook 512) does not match"],
    ),
    (
        "sample",
        ["--ckpt", "{out}/nope.pt", "--tokenizer", "{tok}", "--out", "{out}/g.png"],
        ["not found"],
    ),
    (
        "sample",
        ["--ckpt", "{junk}", "--tokenizer", "{tok}", "--out", "{out}/g.png"],
        ["junk.pt", "cannot read"],
    ),
    (
        "sample",
        ["--ckpt", "{torn}", "--tokenizer", "{tok}", "--out", "{out}/g.png"],
        ["not a valid .safetensors"],
    ),
    (
        "sample",
        ["--ckpt", "{st_list}", "--tokenizer", "{tok}", "--out", "{out}/g.png"],
        ["not a valid .safetensors"],
    ),
    (
        "sample",
        ["--ckpt", "{tok}", "--tokenizer", "{tok}", "--out", "{out}/g.png"],
        ["not a generator"],
    ),
    (
        "sample",
        ["--ckpt", "{gen}", "--tokenizer", "{gen}", "--out", "{out}/g.png"],
        ["not a tokenizer"],
    ),
    (
        "sample",
        [*SAMPLE, "--num-samples", 4, "--npz", "{junk_npz}"],
        ["junk.npz", "another generator/tokenizer"],
    ),
    ("sample", [*GRID, "--num-steps", 0], ["--num-steps", "positive integer"]),
    ("sample", [*GRID, "--batch-size", 0], ["--batch-size", "positive integer"]),
    ("sample", [*GRID, "--per-class", 0], ["--per-class", "positive integer"]),
    ("sample", [*GRID, "--mask-schedule", "square"], ["invalid choice"]),
    ("sample", [*SAMPLE, "--out", "{out}"], ["is a folder"]),
    ("sample", [*SAMPLE, "--out", "{file}/g.png"], ["cannot write", "file.txt/g.png"]),
    ("sample", [*GRID, "--num-samples", 4], ["--num-samples and --npz"]),
    ("sample", [*SAMPLE, "--num-samples", 4, "--npz", "{out}/x.png"], ["ending in .npz"]),
    pytest.param("sample", [*GRID, "--device", "cuda"], ["CUDA"], marks=NO_GPU),
    # fid.py
    ("fid", ["fid", "{empty}", "{good}"], ["found 0"]),
    ("fid", ["stats", "{notes}", "--out", "{out}/x.npz"], ["found 0"]),
    ("fid", ["fid", "{one}", "{good}", "--splits", 1], ["need 2 images or more"]),
    ("fid", ["fid", "{two}", "{good}"], ["need 10 images or more"]),
    ("fid", ["fid", "{out}/nope.npz", "{good}"], ["input not found"]),
    ("fid", ["fid", "{mixed}", "{good}"], ["Object arrays"]),
    ("fid", ["fid", "{wrongkey}", "{good}"], ["not an .npz of images (arr_0)"]),
    ("fid", ["fid", "{good}", "{musonly}"], ["or statistics (mu, sigma)"]),
    ("fid", ["fid", "{good}", "{badshape}"], ["statistics do not fit"]),
    ("fid", ["fid", "{float}", "{good}"], ["must be uint8"]),
    ("fid", ["fid", "{junk_npz}", "{good}"], ["junk.npz", "not an .npz"]),
    ("fid", ["fid", "{trunc_stats}", "{good}"], ["trunc_stats.npz", "not an .npz"]),
    ("fid", ["fid", "{nan}", "{good}"], ["NaN"]),
    ("fid", ["fid", "{tf1}", "{two}", "--resize", "torch"], ["--resize tf1"]),
    (
        "fid",
        ["stats", "{two}", "--out", "{out}/x.npz", "--inception", "{out}/w.pth"],
        ["w.pth", "not found"],
    ),
    (
        "fid",
        ["stats", "{two}", "--out", "{out}/x.npz", "--inception", "{junk_pth}"],
        ["junk.pth", "cannot read"],
    ),
    (
        "fid",
        ["stats", "{pngs}", "--out", "{out}/x.npz", "--inception", "{inception}"],
        ["001.png", "not a readable image"],
    ),
    ("fid", ["fid", "{good}", "{good}", "--json", "{out}"], ["is a folder"]),
    ("fid", ["stats", "{two}", "--out", "{out}"], ["is a folder"]),
    ("fid", ["stats", "{two}", "--out", "{out}/x.npz", "--batch-size", 0], ["--batch-size"]),
    ("fid", ["fid", "{good}", "{good}", "--splits", 0], ["--splits"]),
    pytest.param("fid", ["fid", "{good}", "{good}", "--device", "cuda"], ["CUDA"], marks=NO_GPU),
    (
        "fid",
        ["rfid", "--tokenizer", "{tok}", "--images", "{big}", "--inception", "{inception}"],
        ["48, 48"],
    ),
    (
        "fid",
        ["rfid", "--tokenizer", "{out}/nope.pt", "--images", "{two}"],
        ["nope.pt", "not found"],
    ),
    ("fid", ["rfid", "--tokenizer", "{tok}", "--images", "{good}"], ["holds statistics"]),
    pytest.param("fid", ["fid", "{good}", "{good}", "--json", "{file}/r.json"], ["file.txt"]),
    pytest.param(
        "fid",
        ["stats", "{two}", "--out", "{file}/s.npz", "--inception", "{inception}"],
        ["file.txt"],
    ),
    # train_tok.py
    ("train_tok", [*TRAIN_TOK, "--data", "{empty}"], ["no images"]),
    ("train_tok", [*TRAIN_TOK, "--data", "{out}/nowhere"], ["no such file or folder"]),
    ("train_tok", [*TRAIN_TOK, "--recipe", "stage3"], ["stage3"]),
    (
        "train_tok",
        [*TRAIN_TOK, "--init", "{a_list}"],
        ["list.pt", "is a list, not tokenizer weights"],
    ),
    ("train_tok", [*TRAIN_TOK, "--init", "{junk}"], ["junk.pt"]),
    ("train_tok", [*TRAIN_TOK, "--batch-size", 0], ["--batch-size"]),
    ("train_tok", [*TRAIN_TOK, "--save-every", 0], ["--save-every"]),
    ("train_tok", [*TRAIN_TOK, "--log-every", 0], ["--log-every"]),
    ("train_tok", [*TRAIN_TOK, "--eval-every", 0], ["--eval-every"]),
    ("train_tok", [*TRAIN_TOK, "--eval-size", 6000], ["--eval-size"]),
    ("train_tok", [*TRAIN_TOK, "--preset", "titok_l32", "--recipe", "single"], ["two-stage"]),
    (
        "train_tok",
        [*TRAIN_TOK, "--preset", "titok_s128", "--recipe", "stage1"],
        ["--vqgan", "maskgit-vqgan-imagenet-f16-256.bin"],
    ),
    ("train_tok", [*TRAIN_TOK, "--recipe", "stage1"], ["--vqgan", "--recipe vqgan"]),
    (
        "train_tok",
        [*TRAIN_TOK, "--width", 130],
        ["--width 130 is not a multiple of tiny's 4 attention heads"],
    ),
    ("train_tok", [*TRAIN_TOK, "--num-tokens", 0], ["--num-tokens"]),
    pytest.param("train_tok", [*TRAIN_TOK, "--device", "cuda"], ["CUDA"], marks=NO_GPU),
    pytest.param("train_tok", [*TRAIN_TOK, "--out", "{file}"], ["file.txt"]),
    pytest.param("train_tok", [*TRAIN_TOK, "--seed", -1], ["--seed"]),
    # train_gen.py
    (
        "train_gen",
        [*TRAIN_GEN, "--width", 97],
        ["--width 97 is not a multiple of tiny's 4 attention heads"],
    ),
    ("train_gen", [*TRAIN_GEN, "--tokens", "{tokens_label10}"], ["10 classes"]),
    (
        "train_gen",
        [*TRAIN_GEN, "--tokens", "{out}/nowhere", "--tokenizer", "{out}/no_tok.pt"],
        ["no tokens"],
    ),
    ("train_gen", [*TRAIN_GEN, "--batch-size", 0], ["--batch-size"]),
    ("train_gen", [*TRAIN_GEN, "--save-every", 0], ["--save-every"]),
    ("train_gen", [*TRAIN_GEN, "--log-every", 0], ["--log-every"]),
    ("train_gen", [*TRAIN_GEN, "--eval-every", 0], ["--eval-every"]),
    pytest.param("train_gen", [*TRAIN_GEN, "--device", "cuda"], ["CUDA"], marks=NO_GPU),
    pytest.param("train_gen", [*TRAIN_GEN, "--out", "{file}"], ["file.txt"]),
    pytest.param("train_gen", [*TRAIN_GEN, "--seed", -1], ["--seed"]),
    # train_gen.py tokenize
    ("train_gen", [*TOKENIZE, "--out", "{out}/t", "--batch-size", 0], ["--batch-size"]),
    ("train_gen", [*TOKENIZE, "--out", "{out}/t", "--batch-size", -1], ["--batch-size"]),
    ("train_gen", [*TOKENIZE], ["--out"]),
    (
        "train_gen",
        ["tokenize", "--tokenizer", "{out}/nope.pt", "--data", "{one}", "--out", "{out}/t"],
        ["not found"],
    ),
    (
        "train_gen",
        ["tokenize", "--tokenizer", "{tok}", "--data", "{empty}", "--out", "{out}/t"],
        ["no images"],
    ),
    pytest.param(
        "train_gen", [*TOKENIZE, "--out", "{out}/t", "--device", "cuda"], ["CUDA"], marks=NO_GPU
    ),
    pytest.param("train_gen", [*TOKENIZE, "--out", "{file}"], ["file.txt"]),
]


@pytest.mark.parametrize("cli, argv, words", named(ONE_LINE_ERRORS))
def test_bad_input_is_one_line(cli, argv, words, files, tmp_path):
    """Bad files, flags, folders and devices: exit status != 0, one line naming the problem, and the
    inputs (earlier output of other stages) untouched."""
    folder = files["tok"].parent
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    one_line_error(run(cli, *fill(argv, {**files, "out": tmp_path})), *words)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


MISSING_FOLDER_OUTPUTS = [  # (script, argv writing {dest}/<name>, name)
    ("sample", [*SAMPLE, "--classes", 0, "--per-class", 1, "--out", "{dest}/g.png"], "g.png"),
    ("sample", [*SAMPLE, "--num-samples", 2, "--batch-size", 2, "--npz", "{dest}/s.npz"], "s.npz"),
    ("fid", ["stats", "{two}", "--out", "{dest}/s.npz", "--inception", "{inception}"], "s.npz"),
    ("fid", ["{good}", "{good}", "--json", "{dest}/r.json"], "r.json"),
    ("tokenizer", ["encode", "{img}", "--ckpt", "{tok}", "--out", "{dest}/ids.npy"], "ids.npy"),
    (
        "tokenizer",
        ["reconstruct", "{img}", "--ckpt", "{tok}", "--out", "{dest}/rec"],
        "rec/img_recon.png",
    ),
    ("train_gen", [*TOKENIZE, "--out", "{dest}/t"], "t/tokens.npy"),
]


@pytest.mark.parametrize("cli, argv, name", named(MISSING_FOLDER_OUTPUTS))
def test_an_output_folder_that_does_not_exist(cli, argv, name, files, tmp_path):
    """Every script makes the missing folders of an output (common.write_atomic) and writes there."""
    dest = tmp_path / "no" / "such"
    r = run(cli, *fill(argv, {**files, "out": tmp_path, "dest": dest}))
    assert r.code == 0 and (dest / name).is_file(), r.err


DISK_FULL = [  # (script, argv writing {out}/<name>, name)
    ("sample", [*SAMPLE, "--classes", 0, "--per-class", 1, "--out", "{out}/grid.png"], "grid.png"),
    (
        "fid",
        ["stats", "{two}", "--out", "{out}/stats.npz", "--inception", "{inception}"],
        "stats.npz",
    ),
    ("fid", ["{good}", "{tf1}", "--json", "{out}/fid.json"], "fid.json"),
    ("tokenizer", ["reconstruct", "{img}", "--ckpt", "{tok}", "--out", "{out}"], "img_recon.png"),
    ("tokenizer", ["encode", "{img}", "--ckpt", "{tok}", "--out", "{out}/ids.npy"], "ids.npy"),
]


def assert_disk_full_message(r: Run, path: Path) -> None:
    """One line naming the file and how much space there is."""
    message = one_line_error(r, path)
    assert SPACE.search(message), f"no free space in: {message}"


@pytest.mark.parametrize("cli, argv, name", named(DISK_FULL))
def test_disk_full_keeps_the_previous_file(cli, argv, name, files, tmp_path, monkeypatch):
    """The same command twice, the second time on a full disk: the first output is kept as it was."""
    argv = fill(argv, {**files, "out": tmp_path})
    assert run(cli, *argv).code == 0
    before = snapshot(tmp_path)
    disk_full(monkeypatch, name)
    r = run(cli, *argv)
    monkeypatch.undo()
    assert_disk_full_message(r, tmp_path / name)
    assert snapshot(tmp_path) == before  # the previous file intact, no temporary file left


@pytest.mark.parametrize("cli", ["train_tok", "train_gen"])
def test_disk_full_while_training_keeps_the_last_checkpoint(
    cli, trained, files, tmp_path, monkeypatch
):
    out = copy_run(trained, cli, tmp_path)
    before = snapshot(out)
    disk_full(monkeypatch, "ckpt_00000002")
    r = run(cli, "--out", out, "--resume", "--max-steps", 2, *train_args(cli, files))
    monkeypatch.undo()
    assert_disk_full_message(r, out / "ckpt_00000002.pt")
    after = snapshot(out)
    (
        after.pop("log.jsonl"),
        before.pop("log.jsonl"),
    )  # (step 2 was logged; a resume cuts the log back to step 1)
    assert after == before  # the step-1 checkpoint and the export as they were, no temporary file


def test_disk_full_while_sampling_keeps_the_finished_batches(files, tmp_path, monkeypatch):
    argv = [*SAMPLE, "--num-samples", 4, "--batch-size", 2, "--npz", tmp_path / "s.npz"]
    argv = fill(argv, files)
    disk_full(monkeypatch, "s.npz")
    r = run("sample", *argv)
    monkeypatch.undo()
    assert_disk_full_message(r, tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists() and not [
        p for p in tmp_path.rglob("*") if "tmp" in p.name
    ]
    r = run("sample", *argv)  # with space again, the rerun joins the batches already sampled
    assert r.code == 0 and "resuming" in r.out and (tmp_path / "s.npz").is_file(), r.out + r.err


def test_a_real_process_exits_as_the_in_process_runs_do(files, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tokenizer.py"),
            "reconstruct",
            str(files["img"]),
            "--ckpt",
            str(files["junk"]),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 1
    one_line_error(Run(r.returncode, r.stdout, r.stderr), "junk.pt", "cannot read")
