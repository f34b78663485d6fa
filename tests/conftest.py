"""Shared test fixtures (pytest loads this file itself): small checkpoints, token folders and FID weights
that several test files build the same way."""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import generator as G
import sample
import tokenizer as T
import train_gen
import train_tok

SHARED = os.environ.get("TITOK_SHARED")
PARITY = Path(SHARED) / "parity" if SHARED else None


def tiny_tokenizer(codebook_size: int = 1024) -> T.TiTok:
    """Random weights re-drawn at unit gain so the decoded images have structure (the reference
    init decodes every token sequence to an almost black image)."""
    torch.manual_seed(1)
    tok = T.TiTok(dataclasses.replace(T.PRESETS["tiny"], codebook_size=codebook_size)).eval()
    with torch.no_grad():
        for p in tok.parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
        tok.decoder.conv_out.weight.mul_(0.2)
        tok.decoder.conv_out.bias.fill_(0.5)
    return tok


def save_tokenizer(tok: T.TiTok, path: Path) -> Path:
    torch.save(
        {
            "kind": "tokenizer",
            "config": dataclasses.asdict(tok.config),
            "model": tok.state_dict(),
            "ema": None,
        },
        path,
    )
    return path


def save_generator(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    gen = G.build_generator(G.PRESETS["tiny"])
    with (
        torch.no_grad()
    ):  # unit-gain weights: confident, varied logits instead of nearly uniform ones
        for p in gen.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    torch.save(
        {
            "kind": "generator",
            "preset": "tiny",
            "config": G.config_to_dict(gen.config),
            "model": gen.state_dict(),
            "ema": None,
            "step": 0,
        },
        path,
    )
    return path


def make_tokens(
    folder: Path,
    n: int = 64,
    codebook: int = 1024,
    k: int = 32,
    classes: int = 10,
    label_max: int | None = None,
    seed: int = 0,
) -> Path:
    """A token folder as `tokenize` writes it, with random ids."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % classes if label_max is None else np.full(n, label_max)
    np.save(folder / "tokens.npy", rng.integers(0, codebook, (n, k)).astype(np.uint16))
    np.save(folder / "labels.npy", labels.astype(np.int16))
    np.save(folder / "heldout_tokens.npy", rng.integers(0, codebook, (8, k)).astype(np.uint16))
    np.save(folder / "heldout_labels.npy", (np.arange(8) % classes).astype(np.int16))
    (folder / "meta.json").write_text(
        json.dumps(
            {
                "codebook_size": codebook,
                "num_tokens": k,
                "num_classes": classes,
                "train": n,
                "heldout": 8,
                "tokenizer": "none",
                "data": "random",
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def helpers() -> SimpleNamespace:
    """The builders above, for test files (they are functions, not fixtures: tests call them with arguments)."""
    return SimpleNamespace(
        tiny_tokenizer=tiny_tokenizer,
        save_tokenizer=save_tokenizer,
        save_generator=save_generator,
        make_tokens=make_tokens,
    )


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """The parity fixture's random weights, or (on a fresh clone) a seeded random network saved the
    same way: the pipeline tests need some weights file, not the real ones."""
    if SHARED:
        return PARITY / "fid_inception_random.pt"
    torch.manual_seed(0)
    net = fid.FIDInceptionV3()
    for (
        m
    ) in net.modules():  # He init keeps the activations alive through ~90 ReLU layers (the default
        if isinstance(
            m, torch.nn.Conv2d
        ):  # init shrinks them to 0: every image, the same features)
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save({k: v.half() for k, v in net.state_dict().items()}, path)
    return path


# -- running the command lines in-process, and checking their one-line errors (test_bad_inputs,
#    test_faults, test_gpu_ready) ------------------------------------------------------------------


CLIS = {
    "tokenizer": T.main,
    "sample": sample.main,
    "fid": fid.main,
    "train_tok": train_tok.main,
    "train_gen": train_gen.main,
}


# -- helpers ----------------------------------------------------------------------------------------


class Run(NamedTuple):
    code: int
    out: str
    err: str


def run(cli: str, *argv) -> Run:
    """`python <cli>.py argv`, in-process: its exit status, stdout and stderr. sys.exit("message")
    prints the message and exits with status 1, as in a real process; any other exception escapes
    (a traceback fails the test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = CLIS[cli]([str(a) for a in argv]) or 0
        except SystemExit as e:
            code = e.code or 0
            if isinstance(code, str):
                print(code, file=err)
                code = 1
    return Run(code, out.getvalue(), err.getvalue())


PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar (drawn on stderr, line by line with \r)


def one_line_error(r: Run, *words) -> str:
    """The message of a run that failed as it should: exit status != 0, no traceback, and on stderr
    one line `error: ...` (or argparse's usage lines, then its one `prog: error: ...`) holding every
    one of `words` (case-insensitive)."""
    assert r.code != 0, f"exit status 0; stdout ends: {r.out[-800:]}"
    assert "Traceback" not in r.err, r.err
    lines = [s for s in re.split(r"[\r\n]", r.err) if s.strip() and not PROGRESS.search(s)]
    if lines and lines[0].startswith("usage:"):
        assert r.code == 2 and re.match(r"[^:]+: error: ", lines[-1]), r.err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    message = lines[-1]
    missing = [str(w) for w in words if str(w).lower() not in message.lower()]
    assert not missing, f"{missing} not in the message: {message}"
    return message


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` -> sha256 of its bytes: compared before and after a run, "no earlier
    output was changed or lost" (and no file, a temporary one included, was added). A job's .lock
    file (common.exclusive: who holds the folder) is no output."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def image_folder(folder: Path, n: int = 12) -> Path:
    """n small random PNGs in two class folders (c0, c1)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"c{i * 2 // n}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            folder / f"c{i * 2 // n}" / f"{i:02d}.png"
        )
    return folder
