"""probes.py: the measurements of probes.sh (the script itself runs in .ci/run, SMOKE=1)."""

import torch

import probes


def test_linear_probe_separates_a_separable_set_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(3, 20, generator=g)[y] * 3 + torch.randn(
        300, 20, generator=g
    )  # three separated blobs
    assert probes.linear_probe(x[:200], y[:200], x[200:], y[200:]) > 0.95
    shuffled = y[:200][torch.randperm(200, generator=g)]  # labels unrelated to x
    assert probes.linear_probe(x[:200], shuffled, x[200:], y[200:]) < 0.6
