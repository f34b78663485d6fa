"""sample.py end to end on CPU with a tiny random generator and tiny random tokenizer: the grid,
the resumable sharded .npz, torchrun over two processes, and one-line errors for bad input."""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generator as G  # noqa: E402
import sample  # noqa: E402
import tokenizer as T  # noqa: E402

# One thread everywhere: the in-process reference and every CLI process compute bit-identically
# (torchrun also gives each worker one thread), and a shared 2-core machine does not stall.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    torch.save({"kind": "tokenizer", "config": T.config_to_dict(tok.config), "model": tok.state_dict(),
                "ema": None}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(generator checkpoint, tokenizer checkpoint) in our format, preset `tiny`."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    gen = G.build_generator(G.PRESETS["tiny"])
    with torch.no_grad():  # unit-gain weights: confident, varied logits instead of nearly uniform ones
        for p in gen.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    torch.save({"kind": "generator", "preset": "tiny", "config": G.config_to_dict(gen.config),
                "model": gen.state_dict(), "ema": None, "step": 0}, d / "gen.pt")
    return d / "gen.pt", save_tokenizer(tiny_tokenizer(), d / "tok.pt")


def run_cli(*args, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    cmd = [sys.executable, *launcher, str(ROOT / "sample.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def test_grid_end_to_end(ckpts, tmp_path):
    from PIL import Image
    gen, tok = ckpts
    out = tmp_path / "grid.png"
    r = run_cli("--ckpt", gen, "--tokenizer", tok, "--classes", 1, 3, "--per-class", 2,
                "--batch-size", 4, "--seed", 5, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stdout
    grid = np.asarray(Image.open(out).convert("RGB"))

    # The same samples computed here through the API (batch 0 of seed 5, tiny defaults).
    model, tokz = G.load_generator(gen), T.load_tokenizer(tok)
    want = sample.sample_images(model, tokz, [1, 1, 3, 3], G.DEFAULT_SAMPLING["tiny"],
                                sample.batch_seed(5, 0), torch.device("cpu"), "fp32")
    assert want.shape == (4, 32, 32, 3) and want.std() > 10   # real images, not a flat colour
    assert not np.array_equal(want[0], want[1])
    margin, cell = 40, 64  # 32 px images are drawn at 2x
    assert grid.shape == (2 * cell, margin + 2 * cell, 3)
    for i in range(4):
        row, col = divmod(i, 2)
        tile = grid[row * cell:(row + 1) * cell, margin + col * cell:margin + (col + 1) * cell]
        assert np.array_equal(tile[::2, ::2], want[i]), f"tile {i} is not sample {i}"
    for row in range(2):  # each row has its class id written in the margin
        assert (grid[row * cell:(row + 1) * cell, :margin] < 128).any()


def npz_args(ckpts, out, seed=3):
    return ["--ckpt", ckpts[0], "--tokenizer", ckpts[1], "--num-samples", 10, "--batch-size", 4,
            "--seed", seed, "--npz", out]


@pytest.fixture(scope="module")
def uninterrupted(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("npz") / "a.npz"
    r = run_cli(*npz_args(ckpts, out))
    assert r.returncode == 0, r.stderr
    with np.load(out) as f:
        return f["arr_0"], f["labels"]


def test_npz_layout(uninterrupted):
    images, labels = uninterrupted
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3)
    assert labels.tolist() == [i % 10 for i in range(10)]  # the protocol: sample i has class i % C
    assert len({im.tobytes() for im in images}) == 10


def test_npz_resume_equals_uninterrupted(ckpts, uninterrupted, tmp_path):
    out = tmp_path / "b.npz"
    args = npz_args(ckpts, out)
    r = run_cli(*args, "--max-batches", 1)            # "interrupted" after one of three batches
    assert r.returncode == 0, r.stderr
    assert "1/3 batches done" in r.stdout and not out.exists()
    assert sorted(p.name for p in (tmp_path / "b.npz.shards").glob("batch_*")) == ["batch_000000.npz"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "resuming: 1/3 batches" in r.stdout
    assert not (tmp_path / "b.npz.shards").exists()
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], uninterrupted[0])
        assert np.array_equal(f["labels"], uninterrupted[1])
    # A finished .npz is kept on a rerun (the main job reruns every stage) and recorded once.
    stamp = out.stat().st_mtime_ns
    r = run_cli(*args, "--results", tmp_path / "r.json")
    assert r.returncode == 0 and "nothing to do" in r.stdout and out.stat().st_mtime_ns == stamp, r.stderr
    assert not (tmp_path / "r.json").exists()
    r = run_cli(*args[:-1], tmp_path / "d.npz", "--results", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "r.json").read_text())["sample"]
    assert rec["num_samples"] == 10 and rec["wall_s"] > 0 and rec["seed"] == 3
    r = run_cli(*npz_args(ckpts, out, seed=5))  # the finished file holds another seed's samples
    assert r.returncode == 1 and "other settings" in r.stderr and out.stat().st_mtime_ns == stamp
    # Shards of a run with other settings are not silently mixed in.
    r = run_cli(*npz_args(ckpts, tmp_path / "c.npz"), "--max-batches", 1)
    assert r.returncode == 0, r.stderr
    r = run_cli(*npz_args(ckpts, tmp_path / "c.npz", seed=4))
    assert r.returncode == 1 and "seed" in r.stderr and r.stderr.strip().startswith("error:")


def test_killed_run_resumes(ckpts, uninterrupted, tmp_path):
    """SIGKILL right after the first shard lands (a half-written shard may be left behind)."""
    out = tmp_path / "k.npz"
    cmd = [sys.executable, str(ROOT / "sample.py"), *map(str, npz_args(ckpts, out))]
    child = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, deadline = tmp_path / "k.npz.shards" / "batch_000000.npz", time.time() + 120
    while not first.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    child.kill()
    child.wait()
    assert first.exists() and not out.exists(), "the run was not interrupted mid-way"
    r = run_cli(*npz_args(ckpts, out))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], uninterrupted[0])


def test_torchrun_two_processes_equal_one(ckpts, uninterrupted, tmp_path):
    out = tmp_path / "t.npz"
    r = run_cli(*npz_args(ckpts, out), torchrun=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 processes" in r.stderr  # tqdm's description on rank 0
    assert "rank 0 sampled 6 images" in r.stdout  # batches 0 and 2 (4 + 2 images); rank 1 did batch 1
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], uninterrupted[0])
        assert np.array_equal(f["labels"], uninterrupted[1])


def test_bad_input_exits_with_one_line(ckpts, tmp_path):
    gen, tok = ckpts
    r = run_cli("--ckpt", gen, "--tokenizer", tok, "--classes", 3, 10, "--out", tmp_path / "g.png")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "[10]" in r.stderr and "0..9" in r.stderr and not (tmp_path / "g.png").exists()


def test_bad_inputs_are_reported(ckpts, tmp_path):
    gen, tok = ckpts
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 100)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    small = save_tokenizer(tiny_tokenizer(codebook_size=512), tmp_path / "tok512.pt")
    grid = ["--out", tmp_path / "g.png"]
    cases = [
        (["--ckpt", gen, "--tokenizer", tok, "--classes", -1, *grid], "out of range"),
        (["--ckpt", gen, "--tokenizer", small, *grid], "codebook 512) does not match"),
        (["--ckpt", tmp_path / "nope.pt", "--tokenizer", tok, *grid], "not found"),
        (["--ckpt", junk, "--tokenizer", tok, *grid], "cannot read"),
        (["--ckpt", torn, "--tokenizer", tok, *grid], "not a valid .safetensors"),
        (["--ckpt", tok, "--tokenizer", tok, *grid], "not a generator"),
        (["--ckpt", gen, "--tokenizer", gen, *grid], "not a tokenizer"),
        (["--ckpt", gen, "--tokenizer", tok, "--out", tmp_path / "no" / "g.png"], "does not exist"),
        (["--ckpt", gen, "--tokenizer", tok, "--num-samples", 4, "--npz", tmp_path], "is a folder"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            sample.main([str(a) for a in argv])
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg, msg
        assert words in msg, msg
