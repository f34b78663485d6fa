"""What CPUs can check of the first multi-GPU run: which GPU a process takes, run folders the nodes
do not share, no per-sample host copies in the generator step, one finiteness check per step, the
data-loading processes chosen from the cores, the nearest-code search in true fp32 when TF32 is on,
and `tokenize` split over processes (one folder listing, decoded by worker processes). The checks
that need a GPU are tests/gpu_check.sh.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_folder, run

import common
import tokenizer as T
import train_gen

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize(
    "world, local_rank, gpus, asked, gpu",
    [
        (8, 5, 8, "cuda", 5),  # one node of 8 GPUs: local rank r takes GPU r
        (8, 5, 1, "cuda", 0),  # SLURM --gpus-per-task=1: each process sees one GPU, as cuda:0
        (16, 13, 8, "cuda", 5),  # (LOCAL_RANK is per node; a wrong launcher still gets a GPU)
        (8, 3, 4, "cuda:7", 3),  # under torchrun the local rank decides, not --device
        (1, 0, 4, "cuda:2", 2),  # one process: the GPU asked for
        (1, 0, 4, "cuda", 0),
    ],
)
def test_each_process_takes_a_gpu_it_can_see(world, local_rank, gpus, asked, gpu):
    got = common.gpu_of_process(torch.device(asked), world, local_rank, gpus)
    assert got == torch.device("cuda", gpu)


def test_a_run_folder_the_processes_do_not_share_is_refused(tmp_path):
    """Two torchrun processes each given its own --out, as nodes with node-local disks would see
    one path: refused in one line before any step (rank 1 would start from step 0 while rank 0
    resumes, and the job would hang)."""
    cmd = f"{sys.executable} train_tok.py --out {tmp_path}/out$RANK --max-steps 1 --eval-size 0"
    r = subprocess.run(
        [*TORCHRUN, "--no-python", "bash", "-c", cmd],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    ours = [s for s in r.stderr.splitlines() if s.startswith("error: ")]  # (torchrun adds its own)
    assert r.returncode != 0 and 'train_tok.py", line' not in r.stderr, r.stderr[-3000:]
    assert len(ours) == 1 and f"1 of 2 processes do not see {tmp_path}/out0/.lock" in ours[0]
    assert not list(tmp_path.glob("out*/ckpt_*.pt"))


def test_generator_step_copies_the_batch_once(monkeypatch):
    """Masking is seeded per sample; it runs on the CPU and the batch goes to the device in one
    copy, not one host round trip per sample (~128 per step)."""
    d = common.Dist(0, 1, torch.device("cpu"))
    net = train_gen.generator.build_generator(train_gen.generator.PRESETS["tiny"])
    trainer = train_gen.GenTrainer(train_gen.GenRecipe(), d, net)
    calls = []
    real = torch.Tensor.cpu

    def counted(self, *args, **kwargs):
        calls.append(self.shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    ids, labels = torch.randint(0, 1024, (16, 32)), torch.arange(16) % 10
    train_gen.train_step(trainer, ids, labels, list(range(16)), step=1)
    assert len(calls) <= 2, calls


def test_one_finiteness_check_per_step(monkeypatch, tmp_path, helpers):
    """Each check is an all-reduce and a read by the host: one per optimiser step."""
    checks = []
    real = common.check_finite

    def counted(values, step, last):
        checks.append((step, sorted(values)))
        return real(values, step, last)

    monkeypatch.setattr(common, "check_finite", counted)
    tokens = helpers.make_tokens(tmp_path / "tokens")
    argv = ["--tokens", tokens, "--out", tmp_path / "gen", "--max-steps", 3, "--batch-size", 4]
    assert run("train_gen", *argv).code == 0
    assert checks == [(s, ["gradient norm", "loss"]) for s in range(3)]
    checks.clear()
    argv = ["--out", tmp_path / "tok", "--max-steps", 3, "--batch-size", 2, "--eval-size", 0]
    assert run("train_tok", *argv, "--disc-weight", 0).code == 0
    assert checks == [(s, ["gradient norm", "loss"]) for s in range(3)]


@pytest.mark.parametrize("cores, per_node, default", [(2, 1, 2), (16, 8, 2), (96, 8, 8), (1, 8, 1)])
def test_data_loading_processes_come_from_the_cores(monkeypatch, cores, per_node, default):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    parser = common.Parser()
    common.add_workers_flag(parser)
    assert parser.parse_args([]).workers == default
    assert parser.parse_args(["--workers", "0"]).workers == 0


def test_code_search_runs_in_true_fp32_when_tf32_is_on(monkeypatch):
    """TF32 is on for training on GPUs; the nearest-code search switches it off and back on."""
    quantizer = T.VectorQuantizer(64, 8, use_l2_norm=True)
    seen = []
    real = T.VectorQuantizer.codebook

    def codebook(self):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(self)

    monkeypatch.setattr(T.VectorQuantizer, "codebook", codebook)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    quantizer(torch.randn(2, 8, 1, 4))
    assert seen == [False] and torch.backends.cuda.matmul.allow_tf32


def test_tokenize_over_two_processes_equals_one(tmp_path, helpers):
    """An image folder (listed by process 0 alone, decoded by worker processes), split over two
    torchrun processes: the same token files as one process."""
    data = image_folder(tmp_path / "data", n=24)
    tok = helpers.save_tokenizer(helpers.tiny_tokenizer(), tmp_path / "tok.pt")
    argv = ["--tokenizer", tok, "--data", data, "--eval-size", 4, "--batch-size", 4]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in (("one", [sys.executable]), ("two", TORCHRUN)):
        cmd = [*launcher, "train_gen.py", "tokenize", *map(str, argv), "--out", str(tmp_path / out)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    for name in ("tokens", "labels", "heldout_tokens", "heldout_labels"):
        one, two = (np.load(tmp_path / out / f"{name}.npy") for out in ("one", "two"))
        assert np.array_equal(one, two) and len(one), name
    tokens = np.load(tmp_path / "one" / "tokens.npy")
    assert len(tokens) == 2 * 20 and not np.array_equal(tokens[:20], tokens[20:])  # + mirrored


def test_no_chapter_imports_another_stage():
    """(The design card: what both trainers share lives in common.py.)"""
    for chapter in ("tokenizer", "generator", "sample", "fid", "train_tok", "train_gen", "common"):
        lines = (ROOT / f"{chapter}.py").read_text().splitlines()
        imports = [s for s in lines if s.startswith(("import ", "from "))]
        stages = [s for s in imports if s.split()[1] in ("train_tok", "train_gen", "sample")]
        assert not stages, (chapter, stages)
