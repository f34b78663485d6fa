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


def test_line_plot_draws_each_series_where_its_values_are(tmp_path):
    """A rising series and a falling one: each colour at the bottom on one side and the top on the
    other, the first series' colour in the legend."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "plot.png"
    probes.line_plot({"up": [(8, 0.1), (64, 0.9)], "down": [(8, 0.9), (64, 0.1)]}, path, "t")
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    h, w, _ = a.shape

    def where(colour) -> np.ndarray:  # (row, col) of the pixels of this colour
        return np.argwhere((np.abs(a - np.array(colour)).sum(-1) < 30))

    up, down = where(probes.COLOURS[0]), where(probes.COLOURS[1])
    left_up = up[up[:, 1] < w // 4]
    right_up = up[(up[:, 1] > w // 2) & (up[:, 1] < w - 170)]
    assert left_up[:, 0].mean() > h * 0.6 and right_up[:, 0].mean() < h * 0.4  # rises
    left_down = down[down[:, 1] < w // 4]
    assert left_down[:, 0].mean() < h * 0.4  # falls: starts at the top
