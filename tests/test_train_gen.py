"""train_gen.py: a step trains, a small token set is learnt, resume and torchrun equal one
uninterrupted process, tokenise -> train -> sample works end to end, bad input is one line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generator  # noqa: E402
import tokenizer  # noqa: E402
import train_gen  # noqa: E402
from train_tok import EMA, Dist, make_adamw  # noqa: E402


def make_tokens(folder: Path, n: int = 64, codebook: int = 1024, k: int = 32, classes: int = 10,
                label_max: int | None = None, seed: int = 0) -> Path:
    """A token folder as `tokenize` writes it, with random ids."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % classes if label_max is None else np.full(n, label_max)
    np.save(folder / "tokens.npy", rng.integers(0, codebook, (n, k)).astype(np.uint16))
    np.save(folder / "labels.npy", labels.astype(np.int16))
    np.save(folder / "heldout_tokens.npy", rng.integers(0, codebook, (8, k)).astype(np.uint16))
    np.save(folder / "heldout_labels.npy", (np.arange(8) % classes).astype(np.int16))
    (folder / "meta.json").write_text(json.dumps({"codebook_size": codebook, "num_tokens": k, "num_classes": classes,
                                                  "train": n, "heldout": 8, "tokenizer": "none", "data": "random"}))
    return folder


def run(*args, torchrun: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if torchrun else None
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
           if torchrun else [sys.executable])
    return subprocess.run(cmd + [str(ROOT / "train_gen.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def small_trainer(cfg, R):
    torch.manual_seed(0)
    net = generator.build_generator(cfg)
    return train_gen.GenTrainer(R, Dist(0, 1, 0, torch.device("cpu")), net, net,
                                make_adamw(list(net.named_parameters()), R.lr, (R.beta1, R.beta2), R.weight_decay),
                                EMA(net, R.ema_decay), "fp32")


def test_one_step_is_finite_and_changes_parameters():
    cfg = generator.PRESETS["tiny"]
    t = small_trainer(cfg, train_gen.GenRecipe(batch_size=4, warmup_steps=0, max_steps=10))
    before = {k: v.clone() for k, v in t.net.state_dict().items()}
    ids = torch.randint(0, cfg.codebook_size, (4, cfg.seq_len))
    stats = train_gen.train_step(t, ids, torch.tensor([0, 1, 2, 3]), [0, 1, 2, 3], 0)
    assert all(torch.isfinite(v) for v in stats.values())
    changed = [k for k, v in t.net.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.lm_head.weight" in changed and "model.embeddings.word_embeddings.weight" in changed
    assert len(changed) > 0.9 * len(before)


def test_overfits_a_small_token_set():
    # 8 sequences, one per class, no label dropout: the class fully determines the sequence, so a
    # working objective drives masked-token accuracy to ~100%.
    cfg = generator.GeneratorConfig("imagebert", 64, 16, 8, 64, 2, 4, 128, dropout=0.0, attn_dropout=0.0)
    R = train_gen.GenRecipe(lr=3e-3, end_lr=3e-3, warmup_steps=10, max_steps=400, batch_size=8,
                            label_dropout=0.0, weight_decay=0.0)
    t = small_trainer(cfg, R)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8)
    first = train_gen.heldout_accuracy(t.net, ids, labels, R, torch.device("cpu"))
    for step in range(R.max_steps):
        train_gen.train_step(t, ids, labels, list(range(step * 8, step * 8 + 8)), step)
    acc = train_gen.heldout_accuracy(t.net, ids, labels, R, torch.device("cpu"))
    assert first < 0.2 and acc > 0.98, (first, acc)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    tokens = make_tokens(tmp_path / "tokens")
    common = ["--tokens", tokens, "--batch-size", 8, "--max-steps", 6, "--save-every", 3, "--log-every", 1,
              "--eval-every", 100, "--warmup-steps", 2]
    r = run(*common, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    # "kill" after step 3: a run folder that only has the step-3 checkpoint and the log up to there
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt_00000003.pt", tmp_path / "b")
    lines = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    (tmp_path / "b" / "log.jsonl").write_text("\n".join(lines[:3] + ['{"step": 4, "loss": 99.0}']) + "\n")
    r = run(*common, "--out", tmp_path / "b", "--resume", "--results", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "r.json").read_text())["train_gen"]
    assert rec["steps"] == 6 and rec["global_batch"] == 8 and rec["wall_s"] > 0
    # a finished run resumed again does nothing and keeps its export and recorded numbers
    stamp = (tmp_path / "b" / "generator.pt").stat().st_mtime_ns
    r = run(*common, "--out", tmp_path / "b", "--resume", "--results", tmp_path / "r.json")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    assert (tmp_path / "b" / "generator.pt").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "r.json").read_text())["train_gen"] == rec
    a, b = _weights(tmp_path / "a" / "ckpt_00000006.pt"), _weights(tmp_path / "b" / "ckpt_00000006.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def records(path):  # the log without the wall-clock speeds
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
                for line in path.read_text().splitlines()]
    assert records(tmp_path / "b" / "log.jsonl") == records(tmp_path / "a" / "log.jsonl")
    # without --resume an existing run is never overwritten
    r = run(*common, "--out", tmp_path / "b")
    assert r.returncode == 1 and "--resume" in r.stderr


def test_torchrun_two_processes_equal_one(tmp_path):
    tokens = make_tokens(tmp_path / "tokens")
    common = ["--tokens", tokens, "--max-steps", 3, "--warmup-steps", 1, "--dropout", 0, "--eval-every", 100,
              "--device", "cpu"]
    r1 = run(*common, "--batch-size", 8, "--out", tmp_path / "one")
    assert r1.returncode == 0, r1.stderr
    r2 = run(*common, "--batch-size", 4, "--out", tmp_path / "two", torchrun=2)
    assert r2.returncode == 0, r2.stderr + r2.stdout
    a, b = _weights(tmp_path / "one" / "generator.pt"), _weights(tmp_path / "two" / "generator.pt")
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - generator.build_generator(generator.PRESETS["tiny"]).state_dict()[k]).abs().max().item()
                for k in ["model.lm_head.weight"])
    assert err < 1e-5 and moved > 1e-3, (err, moved)


def test_tokenize_train_sample_round_trip(tmp_path):
    # a tiny random tokenizer, a folder of 24 images in 3 classes
    from PIL import Image
    torch.manual_seed(0)
    tok = tokenizer.TiTok(tokenizer.PRESETS["tiny"])
    torch.save({"kind": "tokenizer", "config": tokenizer.config_to_dict(tok.config), "model": tok.state_dict()},
               tmp_path / "tok.pt")
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    r = subprocess.run([sys.executable, str(ROOT / "train_gen.py"), "tokenize", "--tokenizer", tmp_path / "tok.pt",
                        "--data", tmp_path / "imgs", "--out", tmp_path / "tokens", "--eval-size", "3"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    ids = np.load(tmp_path / "tokens" / "tokens.npy")
    labels = np.load(tmp_path / "tokens" / "labels.npy")
    assert ids.shape == (42, 32) and sorted(set(labels.tolist())) == [0, 1, 2]
    # the stored ids are the tokenizer's ids of the centre-cropped image (first) and its mirror image
    from train_tok import open_image_source, split_heldout
    src = open_image_source(tmp_path / "imgs", 32, False, False)
    train_idx, _ = split_heldout(len(src), 3)
    x = src.load(int(train_idx[0]), None)[0].float()[None] / 255
    assert np.array_equal(ids[0], tok.encode(x)[0].numpy())
    assert np.array_equal(ids[21], tok.encode(x.flip(-1))[0].numpy())
    r = run("--tokens", tmp_path / "tokens", "--out", tmp_path / "gen", "--max-steps", 2, "--batch-size", 4,
            "--eval-every", 2)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "gen" / "samples_00000002.png").is_file()
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", tmp_path / "gen" / "generator.pt",
                        "--tokenizer", tmp_path / "tok.pt", "--classes", "0", "2", "--per-class", "2",
                        "--out", tmp_path / "grid.png"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "grid.png").size[0] > 64


@pytest.mark.parametrize("problem", ["codebook", "labels", "missing"])
def test_bad_input_is_a_one_line_error(problem, tmp_path):
    if problem == "codebook":
        tokens = make_tokens(tmp_path / "t", codebook=512)
        expect = "codebook 512"
    elif problem == "labels":
        tokens = make_tokens(tmp_path / "t", label_max=10)
        expect = "10 classes"
    else:
        tokens = tmp_path / "nowhere"
        expect = "no tokens"
    r = run("--tokens", tokens, "--tokenizer", tmp_path / "no_tok.pt", "--out", tmp_path / "o", "--max-steps", 1)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
