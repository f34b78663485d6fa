"""The measurements of probes.sh that are more than a line: the paper's linear probe (Sec. 4.2).

probes.sh trains the runs with the stage scripts and measures them in a short Python block; what
that block calls lives here, so that the tests can check it.
"""

import math

import torch


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decay: float = 1e-4,
    iters: int = 100,
) -> float:
    """The test accuracy of a multinomial logistic regression on frozen features (N, D),
    standardised with the training set's statistics, fit by L-BFGS: how linearly the tokens
    separate the classes (the paper's linear probing, Sec. 4.2: fewer tokens, more semantic)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    W = torch.zeros(a.shape[1], num_classes, requires_grad=True)  # (D, classes)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(a @ W + bias, train_y)
        value = ce + weight_decay * W.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    return float(((b @ W + bias).argmax(1) == test_y).float().mean())


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def line_plot(series: dict, path, title: str, log2_x: bool = True, size=(640, 400)) -> None:
    """A line chart as a PNG, drawn with PIL (no plotting package): {label: [(x, y), ...]}, one
    colour per label, the x axis in log2 steps (tokens 8, 16, 32, 64) unless log2_x is False."""
    from PIL import Image, ImageDraw

    import common

    points = [p for line in series.values() for p in line]
    fx = math.log2 if log2_x else float
    x0, x1 = min(fx(x) for x, _ in points), max(fx(x) for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    pad = 0.05 * (y1 - y0) or 1.0
    y0, y1 = y0 - pad, y1 + pad
    h, left, top, bottom, right = size[1], 70, 40, 40, size[0] - 160  # (the legend on the right)

    def px(x) -> int:
        return round(left + (fx(x) - x0) / ((x1 - x0) or 1) * (right - left))

    def py(y) -> int:
        return round(h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    draw.rectangle((left, top, right, h - bottom), outline="black")
    for x in sorted({x for x, _ in points}):
        draw.text((px(x) - 8, h - bottom + 6), f"{x:g}", fill="black")
    for y in (y0 + pad, (y0 + y1) / 2, y1 - pad):
        draw.text((8, py(y) - 6), f"{y:.3g}", fill="black")
    for i, (label, line) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(px(x), py(y)) for x, y in sorted(line)]
        draw.line(xy, fill=colour, width=3)
        for u, v in xy:
            draw.ellipse((u - 4, v - 4, u + 4, v + 4), fill=colour)
        draw.text((right + 12, top + 18 * i), f"- {label}", fill=colour)
    common.write_atomic(path, lambda f: image.save(f, format="PNG"))
