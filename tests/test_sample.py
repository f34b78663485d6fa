"""sample.py end to end on CPU with a tiny random generator and tiny random tokenizer: the grid,
the resumable .npz (kill -9, models identified by content) and torchrun over two processes. Bad
input: test_bad_inputs.py."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import generator as G
import sample
import tokenizer as T

ROOT = Path(__file__).resolve().parents[1]

# One thread everywhere: the in-process reference and every CLI process compute bit-identically
# (torchrun also gives each worker one thread), and a shared 2-core machine does not stall.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, helpers):
    """(generator checkpoint, tokenizer checkpoint) in our format, preset `tiny`."""
    d = tmp_path_factory.mktemp("ckpts")
    return helpers.save_generator(d / "gen.pt"), helpers.save_tokenizer(
        helpers.tiny_tokenizer(), d / "tok.pt"
    )


def run_cli(*args, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    )
    cmd = [sys.executable, *launcher, str(ROOT / "sample.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def test_grid_end_to_end(ckpts, tmp_path):
    from PIL import Image

    gen, tok = ckpts
    out = tmp_path / "grid.png"
    r = run_cli(
        "--ckpt",
        gen,
        "--tokenizer",
        tok,
        "--classes",
        1,
        3,
        "--per-class",
        2,
        "--batch-size",
        4,
        "--seed",
        5,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    grid = np.asarray(Image.open(out).convert("RGB"))

    # The same samples computed here through the API (batch 0 of seed 5, tiny defaults).
    model, tokz = G.load_generator(gen), T.load_tokenizer(tok)
    want = sample.sample_images(
        model,
        tokz,
        [1, 1, 3, 3],
        dict(G.DEFAULT_SAMPLING["tiny"], mask_schedule="arccos"),
        5 * 1_000_003 + 0,
        torch.device("cpu"),
        "fp32",
    )
    assert want.shape == (4, 32, 32, 3) and want.std() > 10  # real images, not a flat colour
    assert not np.array_equal(want[0], want[1])
    cell, scale = 34, 4  # image_grid: a 1-px frame around each 32 px image, then 4x (to >= 128 px)
    assert grid.shape == (2 * cell * scale, 2 * cell * scale, 3)
    for i in range(4):
        row, col = divmod(i, 2)  # one row per class
        y, x = (row * cell + 1) * scale, (col * cell + 1) * scale
        assert np.array_equal(
            grid[y : y + 32 * scale : scale, x : x + 32 * scale : scale], want[i]
        ), f"tile {i}"


def npz_args(gen, tok, out, seed=3):
    return [
        "--ckpt",
        gen,
        "--tokenizer",
        tok,
        "--num-samples",
        10,
        "--batch-size",
        4,
        "--seed",
        seed,
        "--npz",
        out,
    ]


@pytest.fixture(scope="module")
def uninterrupted(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("npz") / "a.npz"
    r = run_cli(*npz_args(*ckpts, out))
    assert r.returncode == 0, r.stderr
    with np.load(out) as f:
        return out, f["arr_0"], f["labels"]


def test_npz_layout_summary_and_rerun(ckpts, uninterrupted):
    out, images, labels = uninterrupted
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3)
    assert labels.tolist() == [i % 10 for i in range(10)]  # the protocol: sample i has class i % C
    assert len({im.tobytes() for im in images}) == 10
    assert not out.with_name("a.npz.shards").exists()
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["num_samples"] == 10 and summary["wall_s"] > 0 and summary["seed"] == 3
    assert (
        summary["settings"]["mask_schedule"] == "arccos" and len(summary["generator_sha256"]) == 64
    )
    # A finished .npz is kept on a rerun (the main job reruns every stage)...
    stamp = out.stat().st_mtime_ns
    r = run_cli(*npz_args(*ckpts, out))
    assert r.returncode == 0 and "nothing to do" in r.stdout and out.stat().st_mtime_ns == stamp, (
        r.stderr
    )
    # ...and one of other settings is never overwritten.
    for other in (["--seed", 5], ["--mask-schedule", "cosine"]):
        r = run_cli(*npz_args(*ckpts, out), *other)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
        assert (
            r.stderr.startswith("error: ") and "another generator/tokenizer or settings" in r.stderr
        )
        assert out.stat().st_mtime_ns == stamp


def test_replaced_generator_is_refused(ckpts, uninterrupted, tmp_path, helpers):
    """Models are identified by content: the same path holding other weights is another run."""
    gen, out = tmp_path / "gen.pt", tmp_path / "r.npz"
    shutil.copy(ckpts[0], gen)  # another path, same bytes: the same samples
    r = run_cli(*npz_args(gen, ckpts[1], out))
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], uninterrupted[1])
    helpers.save_generator(gen, seed=1)  # retrained at the same path
    r = run_cli(*npz_args(gen, ckpts[1], out))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "another generator/tokenizer" in r.stderr and out.read_bytes() == data


def test_killed_run_resumes(ckpts, uninterrupted, tmp_path, helpers):
    """SIGKILL right after the first shard lands (a half-written shard may be left behind); shards
    of a replaced generator are not mixed in; the resumed .npz equals the uninterrupted one."""
    gen, out = tmp_path / "gen.pt", tmp_path / "k.npz"
    shutil.copy(ckpts[0], gen)
    cmd = [sys.executable, str(ROOT / "sample.py"), *map(str, npz_args(gen, ckpts[1], out))]
    child = subprocess.Popen(
        cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first, deadline = tmp_path / "k.npz.shards" / "000000.npy", time.time() + 120
    while not first.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    child.kill()
    child.wait()
    assert first.exists() and not out.exists(), "the run was not interrupted mid-way"
    shards = sorted(p.name for p in first.parent.iterdir())
    helpers.save_generator(gen, seed=1)
    r = run_cli(*npz_args(gen, ckpts[1], out))
    assert r.returncode == 1 and "parts made with generator_sha256" in r.stderr, r.stderr
    assert sorted(p.name for p in first.parent.iterdir()) == shards and not out.exists()
    shutil.copy(ckpts[0], gen)
    r = run_cli(*npz_args(gen, ckpts[1], out))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], uninterrupted[1])
        assert np.array_equal(f["labels"], uninterrupted[2])


def test_torchrun_two_processes_equal_one(ckpts, uninterrupted, tmp_path):
    out = tmp_path / "t.npz"
    r = run_cli(*npz_args(*ckpts, out), torchrun=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 processes" in r.stderr  # tqdm's description on rank 0
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], uninterrupted[1])
        assert np.array_equal(f["labels"], uninterrupted[2])
    assert json.loads(out.with_suffix(".json").read_text())["processes"] == 2
