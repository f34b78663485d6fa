"""Faults a real user meets, beyond bad flags: two jobs on one folder, data changed under a resumed
run, a stage-1 tokenizer where pixels are needed, numerics that depend on the thread count, bad
files in a big image folder, a really full disk, files a crash cut short, the wrong weights in a
weights slot, too large a batch, a read-only HOME, a copied output folder, and a trained run named
by its folder or by one of its checkpoints. Each ends in the right result or in one clear line.

Concurrency and resource limits are tested with real processes (a second process holding a lock,
RLIMIT_FSIZE, RLIMIT_AS, a real tmpfs where the machine allows mounting one).
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_folder, one_line_error, run, snapshot
from PIL import Image

import common
import sample
import train_tok
from common import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", 2, "--eval-size", 0, "--disc-weight", 0]  # a fast train_tok.py run


def script(name: str, *argv, env: dict | None = None, limits=None, timeout: float = 120):
    """`python <name>.py argv` (or `bash <name>`) as a real process."""
    cmd = ["bash", str(ROOT / name)] if name.endswith(".sh") else [sys.executable, f"{name}.py"]
    return subprocess.run(
        cmd + [str(a) for a in argv],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        preexec_fn=limits,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(r: subprocess.CompletedProcess) -> str:
    """A real process that failed in one short line `error: ...`."""
    assert r.returncode not in (0, None) and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [s for s in r.stderr.splitlines() if s.strip() and "%|" not in s]
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 400, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory, helpers) -> dict:
    """A tiny tokenizer and generator export, and a stage-1 tokenizer export."""
    d = tmp_path_factory.mktemp("models")
    stage1 = train_tok.TiTok(train_tok.recipe_config("tiny", "stage1"))
    return {
        "tok": helpers.save_tokenizer(helpers.tiny_tokenizer(), d / "tok.pt"),
        "gen": helpers.save_generator(d / "gen.pt"),
        "stage1": helpers.save_tokenizer(stage1, d / "stage1.pt"),
    }


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    """A finished 2-step train_tok.py run: export, ckpt_00000002.pt, log."""
    out = tmp_path_factory.mktemp("runs") / "tok"
    r = run("train_tok", "--out", out, "--max-steps", 2, *TINY)
    assert r.code == 0, r.err
    return out


# -- 1. one job per folder -----------------------------------------------------------------------


def test_two_training_runs_on_one_out_do_not_mix(tmp_path):
    """Two train_tok.py runs started together on one --out: one trains, the other is refused in one
    line naming the folder and the running process; the folder holds one run; a later --resume
    is not blocked by the lock file the first left."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train_tok.py", "--out", str(out), "--max-steps", "100"]
    jobs = [
        subprocess.Popen(
            [*cmd, *map(str, TINY), "--seed", str(seed)],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed in (1, 2)
    ]
    results = [(job.wait(timeout=300), *job.communicate()) for job in jobs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], [err[-500:] for _, _, err in results]
    refused = next(err for code, _, err in results if code == 1)
    assert refused.startswith(f"error: {out} is in use by process") and refused.count("\n") == 1
    seeds = {c["argv"][c["argv"].index("--seed") + 1] for c in map(torch.load, out.glob("c*.pt"))}
    assert len(seeds) == 1 and (out / ".lock").exists()
    r = run("train_tok", "--out", out, "--resume", "--max-steps", 101)
    assert (
        r.code == 0 and json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 101
    )


@pytest.fixture
def held(tmp_path):
    """Lock a folder from another process, as a running job does: `held(folder)` (a POSIX lock, as
    the Python jobs take), `held(folder, "flock")` (as main.sh and probes.sh take with flock(1))."""
    holders = []

    def hold(folder: Path, kind: str = "lockf") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        code = f"import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.{kind}(f, 2); "
        code += (
            "f.write('process 4242 on elsewhere'); f.flush(); print(1, flush=True); time.sleep(99)"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code, str(folder / ".lock")], stdout=subprocess.PIPE, text=True
        )
        holder.stdout.readline()  # the lock is held
        holders.append(holder)
        return folder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()


def test_every_job_refuses_a_folder_in_use(held, models, tmp_path, helpers):
    """train_gen.py, tokenize, sample.py --npz, main.sh and probes.sh on a folder another process
    holds: one line naming it and the process, nothing written there."""
    tokens = helpers.make_tokens(tmp_path / "tokens")
    gen = held(tmp_path / "gen")
    r = run("train_gen", "--tokens", tokens, "--out", gen, "--max-steps", 1, "--batch-size", 4)
    one_line_error(r, str(gen), "in use by process 4242 on elsewhere")
    assert sorted(p.name for p in gen.iterdir()) == [".lock"]

    made = held(tmp_path / "tok2")
    r = run("train_gen", "tokenize", "--tokenizer", models["tok"], "--out", made)
    one_line_error(r, str(made), "in use by process 4242")

    npz = tmp_path / "s.npz"
    held(Path(f"{npz}.shards"))
    argv = ["--ckpt", models["gen"], "--tokenizer", models["tok"], "--num-samples", 2]
    one_line_error(run("sample", *argv, "--npz", npz), f"{npz}.shards", "in use by process 4242")
    assert not npz.exists()

    for name in ("main.sh", "probes.sh"):
        folder = held(tmp_path / name, "flock")
        r = script(name, env={"OUT": str(folder), "SMOKE": "1"}, timeout=60)
        assert error_line(r).startswith(f"error: {folder} is in use by another {name}")
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]


# -- 2. the data, by content ---------------------------------------------------------------------


def test_resume_refuses_changed_data_and_accepts_moved_data(tmp_path):
    """Images added to --data: --resume refused in one line (it held out other images). The same
    images in another folder (a copied data set): accepted."""
    data, out = image_folder(tmp_path / "data", n=12), tmp_path / "run"
    assert run("train_tok", "--data", data, "--out", out, "--max-steps", 1, *TINY).code == 0
    moved = shutil.copytree(data, tmp_path / "moved")
    image_folder(data / "more", n=3)
    before = snapshot(out)
    r = run("train_tok", "--data", data, "--out", out, "--resume", "--max-steps", 2)
    one_line_error(r, f"--data {data}", "not those", str(out))
    assert snapshot(out) == before
    assert run("train_tok", "--data", moved, "--out", out, "--resume", "--max-steps", 2).code == 0


# -- 3. a stage-1 tokenizer draws no pixels -------------------------------------------------------


def test_stage1_export_refused_where_pixels_are_needed(models, tmp_path, helpers):
    stage1 = models["stage1"]
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    npz = tmp_path / "real.npz"
    np.savez(npz, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    argv = ["--ckpt", models["gen"], "--tokenizer", stage1]
    runs = {
        "sample --npz": run("sample", *argv, "--num-samples", 2, "--npz", tmp_path / "s.npz"),
        "sample grid": run("sample", *argv, "--out", tmp_path / "g.png"),
        "reconstruct": run("tokenizer", "reconstruct", image, "--ckpt", stage1, "--out", tmp_path),
        "rfid": run("fid", "rfid", "--tokenizer", stage1, "--images", npz),
        "train_gen grids": run(
            "train_gen",
            *["--tokens", helpers.make_tokens(tmp_path / "t"), "--tokenizer", stage1],
            *["--out", tmp_path / "gen", "--max-steps", 1, "--batch-size", 4],
        ),
    }
    for what, r in runs.items():
        one_line_error(r, str(stage1), "stage-1", "not pixels", "--recipe stage2")
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "x_recon.png").exists()
    r = run("tokenizer", "encode", image, "--ckpt", stage1, "--out", tmp_path / "ids.npy")
    assert r.code == 0 and np.load(tmp_path / "ids.npy").shape == (1, 32)  # ids need no pixels


# -- 4. the numerics a resumed .npz depends on --------------------------------------------------


def test_npz_shards_of_another_thread_count_are_not_mixed(models, tmp_path, monkeypatch):
    """Shards drawn with N threads per process, resumed with M: refused in one line (CPU kernels may
    add in another order; a pixel may move by 1); resumed with N again: finished."""
    npz = tmp_path / "s.npz"
    argv = ["--ckpt", models["gen"], "--tokenizer", models["tok"], "--num-samples", 4]
    argv += ["--batch-size", 2, "--npz", npz]
    real = sample.sample_batch

    def dies_at_batch_1(*args):
        if args[-1] == 1:
            raise UserError("killed")
        return real(*args)

    monkeypatch.setattr(sample, "sample_batch", dies_at_batch_1)
    one_line_error(run("sample", *argv), "killed")
    monkeypatch.undo()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        r = run("sample", *argv)
    finally:
        torch.set_num_threads(threads)
    one_line_error(r, "threads_per_process", str(threads))
    assert run("sample", *argv).code == 0
    stamp = json.loads(npz.with_suffix(".json").read_text())
    assert stamp["threads_per_process"] == threads and stamp["chip"].startswith("cpu")


# -- 5. bad files in a big image folder ----------------------------------------------------------


def bad_files(folder: Path) -> list[Path]:
    """Files a big folder may hold: empty, text named .png, a truncated JPEG, a dangling link."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:100])
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    return [folder / n for n in ("empty.png", "notes.png", "cut.jpg", "gone.png")]


def test_bad_training_images_are_skipped_named_and_counted(tmp_path):
    """A real run with DataLoader workers: every bad file is named on one short line, replaced by
    the next image, and counted in the log; no worker-count warning on a machine with few cores."""
    data = image_folder(tmp_path / "data", n=12)
    bad = bad_files(data / "c1")
    out = tmp_path / "run"
    r = script(
        "train_tok", "--data", data, "--out", out, "--max-steps", 8, *TINY, "--batch-size", 4
    )
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [s for s in r.stderr.splitlines() if s.startswith("warning: skipped")]
    assert all(any(str(p) in w for w in warnings) for p in bad), r.stderr
    assert all(len(w) < 300 for w in warnings) and "Traceback" not in r.stderr
    assert "DataLoader will create" not in r.stderr  # (more workers than cores)
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["skipped_images"] >= len(bad)


def test_a_folder_of_bad_files_stops_in_one_short_line(tmp_path):
    """Each bad file named once per data-loading process (in any order), then one error line."""
    data = tmp_path / "data"
    bad_files(data)
    r = script("train_tok", "--data", data, "--out", tmp_path / "run", "--max-steps", 1, *TINY)
    lines = r.stderr.splitlines()
    errors = [s for s in lines if not s.startswith("warning: skipped")]
    assert r.returncode == 1 and len(lines) <= 1 + 4 * 2 and len(errors) == 1, r.stderr
    assert errors[0] == "error: 100 images in a row are unreadable; is --data an image folder?"


# -- 6. a really full disk -----------------------------------------------------------------------


def no_bigger_files_than(size: int):
    def limit():  # (a process ignoring SIGXFSZ gets EFBIG from the write that crosses the limit)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def test_checkpoint_on_a_full_disk_is_one_line(tmp_path):
    """torch.save reports a failed write as RuntimeError ("unexpected pos"), not OSError."""
    out = tmp_path / "run"
    r = script(
        "train_tok", "--out", out, "--max-steps", 1, *TINY, limits=no_bigger_files_than(2**20)
    )
    assert f"cannot write {out}/ckpt_00000001.pt" in error_line(r)
    assert not list(out.glob("*.pt")) and not list(out.glob(".*.tmp"))


def test_checkpoint_on_a_full_tmpfs_is_one_line(tmp_path):
    """The same on a real 2 MB file system, where this machine lets us mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        r = script("train_tok", "--out", disk / "run", "--max-steps", 1, *TINY)
        line = error_line(r)
        assert f"cannot write {disk}/run/ckpt_00000001.pt" in line and "MiB free there" in line
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -- 7. files a crash or a copy cut short --------------------------------------------------------


def test_torn_last_log_line_is_dropped_on_resume(tok_run, tmp_path):
    out = shutil.copytree(tok_run, tmp_path / "run")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # killed in the middle of a line
    r = run("train_tok", "--out", out, "--resume", "--max-steps", 3)
    assert r.code == 0, r.err
    steps = [json.loads(s)["step"] for s in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 3]  # (the tiny schedule logs at its end)


def test_damaged_tokens_folder_or_hub_config_is_one_line(models, tmp_path, helpers):
    tokens = helpers.make_tokens(tmp_path / "tokens")
    argv = ["--tokens", tokens, "--out", tmp_path / "gen", "--max-steps", 1, "--batch-size", 4]
    npy = (tokens / "tokens.npy").read_bytes()
    (tokens / "tokens.npy").write_bytes(npy[: len(npy) // 2])
    one_line_error(run("train_gen", *argv), "tokens.npy is damaged")
    (tokens / "meta.json").write_text((tokens / "meta.json").read_text()[:20])
    one_line_error(run("train_gen", *argv), "meta.json: not valid JSON")

    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copy(models["tok"], hub / "pytorch_model.bin")
    (hub / "config.json").write_text('{"model": {"vq_model": {"codebook_si')
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    r = run("tokenizer", "reconstruct", image, "--ckpt", hub, "--out", tmp_path / "o")
    one_line_error(r, "config.json: not valid JSON")


# -- 8. the wrong weights in a weights slot ------------------------------------------------------


def test_weights_slots_say_what_they_were_given(models, tmp_path):
    tok = models["tok"]
    r = run("train_tok", "--out", tmp_path / "a", "--max-steps", 1, *TINY, "--lpips", tok)
    one_line_error(r, str(tok), "this project's tokenizer export, not LPIPS weights")
    images = image_folder(tmp_path / "images", n=2)
    r = run("fid", "stats", images, "--out", tmp_path / "s.npz", "--inception", tok)
    one_line_error(r, "this project's tokenizer export, not FID-Inception weights")
    empty = tmp_path / "folder.pt"
    empty.mkdir()
    for recipe, slot in (("stage1", "--vqgan"), ("single", "--lpips")):
        r = run("train_tok", "--recipe", recipe, "--out", tmp_path / slot, *TINY, slot, empty)
        one_line_error(r, str(empty), "is a folder without weights")


# -- 9. too large a batch ------------------------------------------------------------------------


def test_out_of_memory_names_the_batch_size(tmp_path, helpers):
    tokens = helpers.make_tokens(tmp_path / "tokens")

    def three_gib():
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    argv = ["--tokens", tokens, "--out", tmp_path / "gen", "--batch-size", 30000, "--max-steps", 1]
    line = error_line(script("train_gen", *argv, limits=three_gib))
    assert "out of memory" in line and "--batch-size 30000 per process; lower" in line


# -- 10. the environment -------------------------------------------------------------------------


def test_unwritable_home_fetches_nothing_and_says_so(tmp_path):
    env = {"HOME": "/proc", "WEIGHTS_ONLY": "1", "TITOK_LPIPS_CKPT": "", "TITOK_INCEPTION": ""}
    env["XDG_CACHE_HOME"] = ""
    r = script("main.sh", env=env, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "NOTE: cannot write /proc/.cache/titok" in r.stderr


def test_copied_output_folder_resumes(tmp_path, helpers):
    """main.sh's layout (OUT/tokens, OUT/gen) copied elsewhere: the generator resumes from the copy
    (the tokens are compared by content, not by path)."""
    old = tmp_path / "old"
    helpers.make_tokens(old / "tokens")
    short = ["--batch-size", 4, "--eval-every", 100]
    r = run("train_gen", "--tokens", old / "tokens", "--out", old / "gen", "--max-steps", 1, *short)
    assert r.code == 0, r.err
    new = shutil.copytree(old, tmp_path / "new")
    r = run(
        "train_gen", "--tokens", new / "tokens", "--out", new / "gen", "--resume", "--max-steps", 2
    )
    assert r.code == 0, r.err


def test_npz_names_are_checked_first_and_its_json_is_always_written(models, tmp_path):
    argv = ["--ckpt", models["gen"], "--tokenizer", models["tok"], "--num-samples", 2]
    long = tmp_path / ("x" * 246 + ".npz")  # (250 bytes: its temporary file would not fit)
    one_line_error(run("sample", *argv, "--npz", long), "longer than 242 bytes")
    assert not list(tmp_path.iterdir())
    npz = tmp_path / "s.npz"
    assert run("sample", *argv, "--npz", npz).code == 0
    npz.with_suffix(".json").unlink()  # killed between the .npz and its .json
    r = run("sample", *argv, "--npz", npz)
    assert r.code == 0 and "nothing to do" in r.out and npz.with_suffix(".json").exists()


# -- 11. a trained run, by name ------------------------------------------------------------------


def test_a_run_folder_or_checkpoint_is_a_model(tok_run, models, tmp_path, helpers):
    """Where a model is expected: the run folder (its export) or a ckpt_*.pt (its EMA weights,
    said on stderr), for the tokenizer, the generator and the VQGAN."""
    image = tmp_path / "x.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    for name in (tok_run, tok_run / "ckpt_00000002.pt"):
        r = run("tokenizer", "reconstruct", image, "--ckpt", name, "--out", tmp_path / "o")
        assert r.code == 0 and "PSNR" in r.out, r.err
    assert "the EMA weights of this training checkpoint (step 2)" in r.err
    # a run named by its folder is known by the content of that one file (as models are)
    assert common.sha256_of(tok_run) == common.sha256_of(tok_run / "tokenizer.pt")

    gen = tmp_path / "gen"
    tokens = helpers.make_tokens(tmp_path / "tokens")
    r = run("train_gen", "--tokens", tokens, "--out", gen, "--max-steps", 2, "--batch-size", 4)
    assert r.code == 0, r.err
    for name in (gen, gen / "ckpt_00000002.pt"):
        r = run("sample", "--ckpt", name, "--tokenizer", tok_run, "--out", tmp_path / "g.png")
        assert r.code == 0, r.err

    vq, s1 = tmp_path / "vq", tmp_path / "s1"
    r = run("train_tok", "--recipe", "vqgan", "--out", vq, "--max-steps", 1, *TINY)
    assert r.code == 0, r.err
    r = run("train_tok", "--recipe", "stage1", "--vqgan", vq, "--out", s1, "--max-steps", 1, *TINY)
    assert r.code == 0 and f"{vq}: reading vqgan.pt" in r.err, r.err
