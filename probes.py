"""The measurements of probes.sh that are more than a line: the paper's linear probe (Sec. 4.2).

probes.sh trains the runs with the stage scripts and measures them in a short Python block; what
that block calls lives here, so that the tests can check it.
"""

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
