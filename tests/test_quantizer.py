"""tokenizer.VectorQuantizer's defining properties (TiTok Sec. 3.2 / 4.1; VQ-VAE, van den Oord et al.
2017), each checked against an independent computation: unit-norm codes, nearest code = most similar
code, the straight-through gradient, and the commitment / codebook losses on a hand-worked example."""

import pytest
import torch

from tokenizer import VectorQuantizer


def quantizer(codes, use_l2_norm):
    vq = VectorQuantizer(len(codes), len(codes[0]), use_l2_norm=use_l2_norm)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor(codes, dtype=torch.float32))
    return vq


def tokens(*vectors):
    """(K, C) vectors -> the quantizer's (B=1, C, 1, K) input."""
    return (
        torch.tensor(vectors, dtype=torch.float32).t().reshape(1, len(vectors[0]), 1, len(vectors))
    )


def test_l2_codes_are_unit_norm_and_are_the_output():
    torch.manual_seed(0)
    vq = quantizer((torch.randn(64, 12) * 3).tolist(), use_l2_norm=True)
    zq, stats = vq(torch.randn(2, 12, 1, 32) * 5)
    torch.testing.assert_close(zq.norm(dim=1), torch.ones(2, 1, 32))
    torch.testing.assert_close(vq.lookup(stats["ids"]), zq)  # decoding ids gives the same vectors
    torch.testing.assert_close(vq.codebook().norm(dim=1), torch.ones(64))


@pytest.mark.parametrize("use_l2_norm", [True, False])
def test_nearest_code_is_brute_force_nearest(use_l2_norm):
    torch.manual_seed(1)
    w, z = torch.randn(50, 8), torch.randn(3, 8, 2, 5)
    _, stats = quantizer(w.tolist(), use_l2_norm)(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8).double()  # (B*H*W, C), row-major grid
    if (
        use_l2_norm
    ):  # argmin of the distance between unit vectors == argmax of the cosine similarity
        score = torch.nn.functional.cosine_similarity(flat[:, None], w.double()[None], dim=-1)
    else:
        score = -torch.cdist(flat, w.double())
    best2 = score.topk(2, dim=1).values
    assert (best2[:, 0] - best2[:, 1]).min() > 1e-4  # no near-ties: the answer is unambiguous
    assert torch.equal(stats["ids"].flatten(), score.argmax(1))


@pytest.mark.parametrize("use_l2_norm", [True, False])
def test_straight_through_gradient(use_l2_norm):
    torch.manual_seed(2)
    vq = quantizer(torch.randn(16, 4).tolist(), use_l2_norm)
    z, upstream = torch.randn(2, 4, 1, 6, requires_grad=True), torch.randn(2, 4, 1, 6)
    zq, _ = vq(z)
    (zq * upstream).sum().backward()
    # zq's gradient is copied unchanged onto the (normalised) latent; the codebook gets none from zq
    z2 = z.detach().clone().requires_grad_()
    latent = torch.nn.functional.normalize(z2, dim=1) if use_l2_norm else z2
    (latent * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream if not use_l2_norm else z2.grad)
    assert vq.embedding.weight.grad is None or not vq.embedding.weight.grad.any()


def test_losses_on_two_codes():
    # codes (1,0), (0,1); tokens (0.8,0.6) -> code 0 (sq. dist 0.40 vs 0.80), (-0.1,2) -> code 1
    # (1.01 vs 5.21). Squared errors 0.04+0.36 and 0.01+1.00: mean over 4 entries = 1.41/4 = 0.3525.
    zq, s = quantizer([[1.0, 0.0], [0.0, 1.0]], use_l2_norm=False)(tokens([0.8, 0.6], [-0.1, 2.0]))
    assert s["ids"].tolist() == [[0, 1]]
    torch.testing.assert_close(zq, tokens([1.0, 0.0], [0.0, 1.0]))
    torch.testing.assert_close(s["codebook_loss"], torch.tensor(0.3525))
    torch.testing.assert_close(s["commitment_loss"], torch.tensor(0.25 * 0.3525))  # beta = 0.25
    torch.testing.assert_close(s["quantizer_loss"], torch.tensor(1.25 * 0.3525))


def test_losses_use_the_normalised_vectors():
    # codes (2,0) -> (1,0), (0,10) -> (0,1); token (3,4) -> (0.6,0.8): sq. dist 0.80 vs 0.40 -> code 1,
    # squared error (0.36 + 0.04) / 2 = 0.2. (Unnormalised, (2,0) would be nearer: 17 vs 45.)
    zq, s = quantizer([[2.0, 0.0], [0.0, 10.0]], use_l2_norm=True)(tokens([3.0, 4.0]))
    assert s["ids"].tolist() == [[1]]
    torch.testing.assert_close(zq, tokens([0.0, 1.0]))
    torch.testing.assert_close(s["codebook_loss"], torch.tensor(0.2))
    torch.testing.assert_close(s["commitment_loss"], torch.tensor(0.05))
