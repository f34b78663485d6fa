"""train_gen.py: a step trains, a small token set is learnt, a resumed run and torchrun equal one
uninterrupted process, tokenise -> train -> sample works end to end. Bad input: test_bad_inputs.py."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import generator
import tokenizer
import train_gen

ROOT = Path(__file__).resolve().parents[1]

SHORT = [
    "--batch-size",
    8,
    "--max-steps",
    6,
    "--save-every",
    3,
    "--log-every",
    1,
    "--eval-every",
    100,
    "--warmup-steps",
    2,
]


def main(*args) -> None:
    train_gen.main([str(a) for a in args])


def records(out: Path) -> list[dict]:  # the log without the wall-clock speeds
    return [
        {k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
        for line in (out / "log.jsonl").read_text().splitlines()
    ]


def small_trainer(cfg, R):
    torch.manual_seed(0)
    return train_gen.GenTrainer(
        R, common.Dist(0, 1, torch.device("cpu")), generator.build_generator(cfg)
    )


def test_one_step_is_finite_and_changes_parameters():
    cfg = generator.PRESETS["tiny"]
    t = small_trainer(cfg, train_gen.GenRecipe(batch_size=4, warmup_steps=0, max_steps=10))
    before = {k: v.clone() for k, v in t.net.state_dict().items()}
    ids = torch.randint(0, cfg.codebook_size, (4, cfg.seq_len))
    stats = train_gen.train_step(t, ids, torch.tensor([0, 1, 2, 3]), [0, 1, 2, 3], 0)
    assert all(torch.isfinite(v) for v in stats.values())
    changed = [k for k, v in t.net.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.lm_head.weight" in changed and len(changed) > 0.9 * len(before)


def test_overfits_a_small_token_set():
    # 8 sequences, one per class, no label dropout: the class fully determines the sequence, so a
    # working objective drives masked-token accuracy to ~100%.
    cfg = generator.GeneratorConfig(
        "imagebert", 64, 16, 8, 64, 2, 4, 128, dropout=0.0, attn_dropout=0.0
    )
    R = train_gen.GenRecipe(
        lr=3e-3,
        end_lr=3e-3,
        warmup_steps=10,
        max_steps=400,
        batch_size=8,
        label_dropout=0.0,
        weight_decay=0.0,
    )
    t = small_trainer(cfg, R)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8)
    first = train_gen.heldout_accuracy(t.net, ids, labels, R, torch.device("cpu"))
    for step in range(R.max_steps):
        train_gen.train_step(t, ids, labels, list(range(step * 8, step * 8 + 8)), step)
        if (
            step % 50 == 49
            and (acc := train_gen.heldout_accuracy(t.net, ids, labels, R, torch.device("cpu")))
            > 0.98
        ):
            break
    assert first < 0.2 and acc > 0.98, (first, acc)


def test_resume_equals_uninterrupted(tmp_path, helpers):
    tokens = helpers.make_tokens(tmp_path / "tokens")
    main("--tokens", tokens, "--out", tmp_path / "a", *SHORT)
    # "killed" after step 3: the step-3 checkpoint and the log of a step 4
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt_00000003.pt", tmp_path / "b")
    lines = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    (tmp_path / "b" / "log.jsonl").write_text(
        "\n".join(lines[:3] + ['{"step": 4, "loss": 99.0}']) + "\n"
    )
    main("--tokens", tokens, "--out", tmp_path / "b", "--resume", *SHORT)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_sequences"] == 64 and summary["wall_s"] > 0
    a, b = (torch.load(tmp_path / r / "ckpt_00000006.pt", weights_only=True)["model"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "b") == records(tmp_path / "a") and not list(
        (tmp_path / "b").glob(".*.tmp")
    )
    stamp = (
        (tmp_path / "b" / "generator.pt").stat().st_mtime_ns
    )  # finished: nothing to do, nothing rewritten
    main("--tokens", tokens, "--out", tmp_path / "b", "--resume", *SHORT)
    assert (tmp_path / "b" / "generator.pt").stat().st_mtime_ns == stamp


def test_torchrun_two_processes_equal_one(tmp_path, helpers):
    tokens = helpers.make_tokens(tmp_path / "tokens")
    common = [
        "--tokens",
        tokens,
        "--max-steps",
        3,
        "--warmup-steps",
        1,
        "--dropout",
        0,
        "--eval-every",
        100,
    ]
    main(*common, "--batch-size", 8, "--out", tmp_path / "one")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train_gen.py"),
            *map(str, common),
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    a, b = (
        torch.load(tmp_path / r / "generator.pt", weights_only=True)["model"]
        for r in ("one", "two")
    )
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = (
        (
            a["model.lm_head.weight"]
            - generator.build_generator(generator.PRESETS["tiny"]).state_dict()[
                "model.lm_head.weight"
            ]
        )
        .abs()
        .max()
        .item()
    )
    assert err < 1e-5 and moved > 1e-3, (err, moved)


def test_tokenize_train_sample_round_trip(tmp_path):
    # a tiny random tokenizer, a folder of 24 images in 3 classes
    from PIL import Image

    torch.manual_seed(0)
    tok = tokenizer.TiTok(tokenizer.PRESETS["tiny"])
    torch.save(
        {"kind": "tokenizer", "config": dataclasses.asdict(tok.config), "model": tok.state_dict()},
        tmp_path / "tok.pt",
    )
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / f"class{c}" / f"{i}.png"
            )
    main(
        "tokenize",
        "--tokenizer",
        tmp_path / "tok.pt",
        "--data",
        tmp_path / "imgs",
        "--out",
        tmp_path / "tokens",
        "--eval-size",
        3,
    )
    ids, labels = (
        np.load(tmp_path / "tokens" / "tokens.npy"),
        np.load(tmp_path / "tokens" / "labels.npy"),
    )
    assert ids.shape == (42, 32) and sorted(set(labels.tolist())) == [0, 1, 2]
    # the stored ids are the tokenizer's ids of the centre-cropped image (first) and its mirror image
    from common import split_heldout

    files = sorted((tmp_path / "imgs").rglob("*.png"))
    x = common.load_image(files[int(split_heldout(len(files), 3)[0][0])], 32)[None]
    assert np.array_equal(ids[0], tok.encode(x)[0].numpy()) and np.array_equal(
        ids[21], tok.encode(x.flip(-1))[0].numpy()
    )
    main(
        "--tokens",
        tmp_path / "tokens",
        "--out",
        tmp_path / "gen",
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--eval-every",
        2,
    )
    assert (tmp_path / "gen" / "samples_00000002.png").is_file()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            "--ckpt",
            tmp_path / "gen" / "generator.pt",
            "--tokenizer",
            tmp_path / "tok.pt",
            "--classes",
            "0",
            "2",
            "--per-class",
            "2",
            "--out",
            tmp_path / "grid.png",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "grid.png").size[0] > 64


def test_generator_size_comes_from_the_tokens_and_flags(tmp_path, helpers):
    """Tokens of a 16-token, 512-code tokenizer (train_tok --num-tokens 16 --codebook-size 512) and --width,
    --depth: the checkpoint records that architecture; resuming with another width is refused."""
    tokens = helpers.make_tokens(tmp_path / "tokens", codebook=512, k=16)
    main("--tokens", tokens, "--out", tmp_path / "g", "--width", 64, "--depth", 2, *SHORT)
    cfg = generator.config_from_dict(
        torch.load(tmp_path / "g" / "generator.pt", weights_only=True)["config"]
    )
    assert (cfg.codebook_size, cfg.seq_len, cfg.hidden_size, cfg.mlp_dim, cfg.num_layers) == (
        512,
        16,
        64,
        256,
        2,
    )
    (tmp_path / "g" / "generator.pt").unlink()
    with pytest.raises(SystemExit, match="was trained with --width"):
        main("--tokens", tokens, "--out", tmp_path / "g", "--resume", "--width", 128, *SHORT)
