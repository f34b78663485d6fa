"""MaskGIT generation over TiTok tokens (Yu et al., 2024, arXiv 2406.07550, Section 3.4).

TiTok turns an image into N discrete tokens (N = 32 for TiTok-L-32), so a class-conditional image
generator only has to model N ids over a codebook of K codes. TiTok uses MaskGIT (Chang et al.,
2022):
* Training (MaskGIT Sec. 3.1): replace a scheduled fraction of the ids by a [MASK] id and train a
  bidirectional transformer to predict the originals (label-smoothed cross-entropy).
* Sampling (Sec. 3.2): start from all-[MASK], predict every position, keep the most confident
  predictions and re-mask the rest as the schedule says (Sec. 3.3): ~8 forward passes, not N.
* Classifier-free guidance (Ho & Salimans, 2022): training sometimes replaces the class by a
  "null" class; sampling extrapolates conditional logits away from unconditional ones.

Read top to bottom: 1 training, 2 sampling (`generate`), 3 what both transformers share,
4 ImageBert (TiTok-L-32, B-64), 5 UViTBert (S-128), 6 configs, 7 loading. The tests check logits,
samples and losses against the official code.

The token space seen by both transformers, with K = codebook size and C = number of classes:
    [0, K)          image-token ids from the TiTok codebook
    K               [MASK]
    K + 1 + c       class c, for c in [0, C)
    K + 1 + C       the null class (no label), used for classifier-free guidance
The input is [class token, N image tokens] (labels in [0, C]); the output, logits over the K codes
at the N positions.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

# ----------------------------------------------------------------------------------------------
# 1. Training (MaskGIT Sec. 3.1): the mask schedule, random masking, label dropout, the loss.


def mask_ratio(progress, schedule: str = "arccos"):
    """gamma(r) of MaskGIT Sec. 3.3: the fraction still masked at progress r in [0, 1] (1 -> 0).
    TiTok's arccos fixes tokens faster early and more slowly late than cosine. Tensors (training)
    or floats (sampling: float64, as numpy)."""
    lib = torch if isinstance(progress, torch.Tensor) else math
    if schedule == "arccos":
        return lib.acos(progress) / (math.pi / 2)
    if schedule == "cosine":
        return lib.cos(progress * math.pi / 2)
    if schedule == "linear":
        return 1 - progress
    raise ValueError(f"unknown mask schedule {schedule!r} (arccos, cosine or linear)")


def draw_uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U[0,1) float32 from `generator` (else `device`'s global RNG), on `device`. Every random
    number of training and sampling comes from here, in the reference's order."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def mask_tokens(
    ids: torch.Tensor,
    schedule: str = "arccos",
    *,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time masking (MaskGIT Sec. 3.1): per sample, r ~ U(0,1), then round(N * gamma(r))
    >= 1 random tokens become [MASK]. (B, N) ids -> (masked ids, mask)."""
    B, N = ids.shape
    r = draw_uniform((B,), generator, ids.device)  # draw 1: the progress of each sample
    num_masked = (N * mask_ratio(r, schedule).clamp(1e-6, 1.0)).round().clamp(min=1)  # (B,)
    # Draw 2: a random permutation per row; its entries below num_masked mark as many uniformly
    # chosen positions.
    permutation = draw_uniform((B, N), generator, ids.device).argsort(dim=-1)
    mask = permutation < num_masked[:, None]  # (B, N)
    return torch.where(mask, mask_id, ids), mask


def drop_labels(
    class_labels: torch.Tensor,
    drop_prob: float,
    null_label: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """For classifier-free guidance: each label becomes null_label with probability drop_prob
    (a U(0,1) draw each)."""
    drop = draw_uniform(class_labels.shape, generator, class_labels.device) < drop_prob
    return torch.where(drop, null_label, class_labels)


def masked_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    label_smoothing: float = 0.1,
    unmasked_weight: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskGIT's loss (Eq. 1): label-smoothed cross-entropy with weight 1 on the masked positions
    and `unmasked_weight` on the visible ones (learning to copy them), over the total weight.
    logits (B, N, K), targets and mask (B, N) -> (loss, accuracy on the masked positions)."""
    ce = F.cross_entropy(
        logits.transpose(1, 2), targets, label_smoothing=label_smoothing, reduction="none"
    )  # (B, N)
    m = mask.to(ce.dtype)
    w = (1.0 - m) * unmasked_weight + m
    loss = (ce * w).sum() / (w.sum() + 1e-8)
    correct = (logits.argmax(-1) == targets).to(ce.dtype) * m
    return loss, (correct.sum(1) / (m.sum(1) + 1e-8)).mean()


# ----------------------------------------------------------------------------------------------
# 2. Sampling (MaskGIT Sec. 3.2): iterative decoding with classifier-free guidance.


def gumbel_noise(u: torch.Tensor) -> torch.Tensor:
    """-log(-log(u)): U(0,1) -> Gumbel(0,1); argmax(logits + g) samples softmax(logits)."""
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


def guidance_scale_at(
    step: int, num_steps: int, guidance_scale: float, schedule: str, guidance_pow: float = 3.0
):
    """The CFG scale at `step`. constant: g. linear (MUSE): s/S * g, so step 0 is unguided.
    power-cosine (MDT): 1 + (g-1) * (1 - cos(pi * (s/S)^pow)) / 2, in float32 like the reference
    (bit-exact seeds)."""
    if schedule == "constant":
        return guidance_scale
    if schedule == "linear":
        return step / num_steps * guidance_scale
    if schedule == "power-cosine":
        p = torch.tensor(guidance_pow, dtype=torch.float32)  # 0-dim: fits logits on any device
        return (guidance_scale - 1) * ((1 - torch.cos((step / num_steps) ** p * torch.pi)) / 2) + 1
    raise ValueError(f"unknown guidance schedule {schedule!r} (constant, linear or power-cosine)")


def replay_label_dropout_draws(labels: torch.Tensor, generator, device, passes: int) -> None:
    """The reference's sampler runs the conditional and the unconditional pass as two forwards,
    and each draws U(0,1) per label for its label dropout (of probability 0 or 1 when sampling:
    the draws decide nothing). We run one forward but make the same draws, so that a seed gives
    the reference's samples bit for bit."""
    for _ in range(passes):
        draw_uniform(labels.shape, generator, device)


def guided_logits(
    model: nn.Module,
    ids: torch.Tensor,
    class_labels: torch.Tensor,
    scale,
    schedule: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Logits (B, N, K) for one step; with guidance, the conditional and the unconditional rows in
    ONE forward."""
    guided = float(scale) != 0
    replay_label_dropout_draws(class_labels, generator, ids.device, passes=2 if guided else 1)
    if not guided:
        return model(ids, class_labels).float()
    null = torch.full_like(class_labels, model.null_label)
    logits = model(torch.cat([ids, ids]), torch.cat([class_labels, null])).float()
    cond, uncond = logits.chunk(2)  # (B, N, K) each
    if schedule == "power-cosine":  # MDT's form: interpolate from the unconditional logits
        return uncond + (cond - uncond) * scale
    return cond + (cond - uncond) * scale  # MUSE's form


@torch.no_grad()
def generate(
    model: nn.Module,
    class_labels: torch.Tensor,
    num_steps: int = 8,
    guidance_scale: float = 3.0,
    guidance_schedule: str = "constant",
    temperature: float = 1.0,
    randomize_temperature: float = 4.5,
    softmax_annealing: bool = False,
    guidance_pow: float = 3.0,
    mask_schedule: str = "arccos",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Class-conditional MaskGIT sampling (Sec. 3.2) -> token ids (B, N) int64.

    randomize_temperature scales the Gumbel noise (0 = greedy), annealed linearly to 0; temperature
    is a constant softmax temperature (1 = off). The random numbers come in the reference's order,
    per step: rand(B) [cond], rand(B) [uncond, if guided], U(B, N, K), U(B, N)."""
    B, N, device = class_labels.shape[0], model.seq_len, class_labels.device
    ids = torch.full((B, N), model.mask_id, dtype=torch.long, device=device)  # all masked
    for step in range(num_steps):
        r = (step + 1) / num_steps  # the progress after this step
        t = randomize_temperature * (1.0 - r)  # the annealed Gumbel temperature
        is_mask = ids == model.mask_id  # (B, N)
        scale = guidance_scale_at(step, num_steps, guidance_scale, guidance_schedule, guidance_pow)
        softmax_t = temperature
        if softmax_annealing:  # sharpens the softmax as decoding goes on
            softmax_t = temperature * (0.5 + 0.8 * (1 - r))
        logits = guided_logits(model, ids, class_labels, scale, guidance_schedule, generator)
        logits = logits / softmax_t

        # 1. Predict: sample a candidate id for every position (Gumbel-max at temperature t).
        noise = gumbel_noise(draw_uniform(logits.shape, generator, device))
        candidates = (logits + t * noise).argmax(-1)  # (B, N)
        confidence = logits.gather(-1, candidates[..., None]).squeeze(-1)  # the candidate's logit
        candidates = torch.where(is_mask, candidates, ids)  # decided tokens never change
        confidence = torch.where(is_mask, confidence, math.inf)  # ...and are never re-masked

        # 2. Schedule: gamma(r) * N stay masked (>= 1, fewer than now); as in the reference, the
        #    count of row 0 bounds every row.
        num_masked = math.floor(N * mask_ratio(r, mask_schedule))
        num_masked = max(1, min(int(is_mask[0].sum()) - 1, num_masked))

        # 3. Re-mask the least confident (with Gumbel noise: "confidence" is itself sampled).
        confidence = confidence + t * gumbel_noise(draw_uniform((B, N), generator, device))
        cutoff = confidence.kthvalue(num_masked, dim=-1, keepdim=True).values  # (B, 1)
        if step == num_steps - 1:  # the last step keeps every candidate
            ids = candidates
        else:
            ids = torch.where(confidence <= cutoff, model.mask_id, candidates)
    return ids


# ----------------------------------------------------------------------------------------------
# 3. What both transformers share: the token space, a Linear for bf16 matmuls, attention, init.


class MaskedTokenModel(nn.Module):
    """Both generators: the token space of the module docstring; forward(ids, labels) -> logits
    (B, N, K). Like TiTok, the whole model reads its config; its modules take explicit arguments."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config, self.preset = config, None  # (the preset: set by load_generator)
        self.codebook_size = config.codebook_size
        self.seq_len = config.seq_len
        self.num_classes = config.num_classes
        self.mask_id = config.codebook_size  # the [MASK] id
        self.null_label = config.num_classes  # the "no class" label
        self.vocab_size = config.codebook_size + config.num_classes + 2

    def input_sequence(self, input_ids: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """[class token, N image tokens] (B, 1+N); class c becomes id K+1+c, the null label C
        becomes K+1+C."""
        class_tokens = (class_labels + self.codebook_size + 1).view(-1, 1)
        return torch.cat([class_tokens, input_ids], dim=1)


class Linear(nn.Linear):
    """nn.Linear casting its input to the weight dtype. After cast_matmuls the matmuls (and the
    attention or GELU between two) run in bf16, the residual stream and the LayerNorms in fp32:
    `x + sublayer(x)` promotes back to fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def cast_matmuls(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Linear weights in `dtype` (bf16: twice the matmul throughput on AMX CPUs and GPUs), except
    the lm_head: ~2% of the FLOPs, and its logits decide which ids are kept (bf16 would flip
    near-ties)."""
    for name, m in model.named_modules():
        if isinstance(m, Linear) and not name.endswith("lm_head"):
            m.to(dtype)
    return model


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """The multi-head scaled dot-product attention of both generators: q, k, v (B, L, D) ->
    (B, L, D)."""
    B, L, D = q.shape
    q, k, v = (t.view(B, L, num_heads, D // num_heads).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, heads, L, D / heads)
    return y.transpose(1, 2).reshape(B, L, D)


def init_weights(m: nn.Module) -> None:
    """The references' init (training from scratch): N(0, 0.02) weights truncated at +-2, zero
    biases."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# 4. ImageBert: a post-LN BERT encoder (Devlin et al. 2019) over [class token, image tokens]. The
#    ModuleDicts only reproduce the levels of the checkpoint's keys
#    (model.encoder.layer.i.attention.self.query ...).


class PostNormResidual(nn.Module):
    """BERT's sub-layer output, LayerNorm(residual + dropout(dense(h))): post-LN, unlike the pre-LN
    ViT blocks."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.dense = Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertLayer(nn.Module):
    """x = LN(x + attention(x)); x = LN(x + MLP(x)), with separate q, k, v projections, all with
    a bias."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.num_heads, self.attn_dropout = num_heads, attn_dropout
        qkv = nn.ModuleDict(
            {"query": Linear(dim, dim), "key": Linear(dim, dim), "value": Linear(dim, dim)}
        )
        output = PostNormResidual(dim, dim, dropout)
        self.attention = nn.ModuleDict({"self": qkv, "output": output})
        self.intermediate = nn.ModuleDict({"dense": Linear(dim, mlp_dim)})
        self.output = PostNormResidual(mlp_dim, dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D)."""
        a = self.attention.self
        dropout_p = self.attn_dropout if self.training else 0.0
        h = attention(a.query(x), a.key(x), a.value(x), self.num_heads, dropout_p)
        x = self.attention.output(h, x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)  # exact (erf) GELU, BERT's


class ImageBert(MaskedTokenModel):
    """TiTok-L-32 / B-64's transformer. The checkpoint calls its body `model`: embeddings,
    encoder.layer.i, lm_head."""

    def __init__(self, config: GeneratorConfig):
        super().__init__(config)
        D, dropout, attn_dropout = config.hidden_size, config.dropout, config.attn_dropout
        embeddings = nn.ModuleDict(
            {
                "word_embeddings": nn.Embedding(self.vocab_size, D),
                "position_embeddings": nn.Embedding(self.seq_len + 1, D),  # learned positions
                "token_type_embeddings": nn.Embedding(2, D),  # BERT's sentence A/B: row 0 only
                "LayerNorm": nn.LayerNorm(D, eps=1e-12),
                "dropout": nn.Dropout(dropout),
            }
        )
        layer = (D, config.num_heads, config.mlp_dim, dropout, attn_dropout)
        layers = [BertLayer(*layer) for _ in range(config.num_layers)]
        body = {
            "embeddings": embeddings,
            "encoder": nn.ModuleDict({"layer": nn.ModuleList(layers)}),
            # Untied: its own (K, D) weight, not the word embeddings (recent `transformers` would
            # tie them).
            "lm_head": Linear(D, self.codebook_size),
        }
        self.model = nn.ModuleDict(body)
        self.apply(init_weights)

    def forward(self, input_ids: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        e = self.model.embeddings
        ids = self.input_sequence(input_ids, class_labels)  # (B, 1+N)
        x = e.word_embeddings(ids) + e.token_type_embeddings.weight[0]  # token type 0 everywhere
        x = x + e.position_embeddings.weight[: ids.shape[1]]
        x = e.dropout(e.LayerNorm(x))  # (B, 1+N, D)
        for layer in self.model.encoder.layer:
            x = layer(x)
        return self.model.lm_head(x[:, 1:])  # the class position dropped


# ----------------------------------------------------------------------------------------------
# 5. UViTBert: pre-LN blocks with long skips (U-ViT, Bao et al. 2023), used for TiTok-S-128.


class UViTBlock(nn.Module):
    """A pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)); qkv has no bias. Out-blocks
    (skip=True) first fuse the matching in-block's output: x = Linear(cat[x, skip]) (U-ViT's
    long skip)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.ModuleDict(
            {"qkv": Linear(dim, 3 * dim, bias=False), "proj": Linear(dim, dim)}
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict({"fc1": Linear(dim, mlp_dim), "fc2": Linear(mlp_dim, dim)})
        self.skip_linear = Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            # (B, L, 2D) -> (B, L, D); this output *is* the residual stream: it keeps skip's dtype
            x = self.skip_linear(torch.cat([x, skip], dim=-1)).to(skip.dtype)
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)  # packed as (3, heads, head_dim)
        x = x + self.attn.proj(attention(q, k, v, self.num_heads))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class UViTBert(MaskedTokenModel):
    """num_layers // 2 in-blocks, a mid-block, num_layers // 2 out-blocks (S-128: 10 + 1 + 10)."""

    def __init__(self, config: GeneratorConfig):
        super().__init__(config)
        D = config.hidden_size
        self.embeddings = nn.Embedding(self.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len + 1, D))
        size = (D, config.num_heads, config.mlp_dim)
        half = config.num_layers // 2
        self.in_blocks = nn.ModuleList(UViTBlock(*size) for _ in range(half))
        self.mid_block = UViTBlock(*size)
        self.out_blocks = nn.ModuleList(UViTBlock(*size, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(D)
        self.lm_head = Linear(D, self.codebook_size)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, input_ids: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        ids = self.input_sequence(input_ids, class_labels)  # (B, 1+N)
        x = self.embeddings(ids) + self.pos_embed  # (B, 1+N, D)
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())  # the last in-block pairs with the first out-block
        return self.lm_head(self.norm(x)[:, 1:])


def build_generator(cfg: GeneratorConfig) -> MaskedTokenModel:
    """An ImageBert or a UViTBert for `cfg`, after checking it."""
    if cfg.hidden_size % cfg.num_heads or cfg.arch not in ("imagebert", "uvit"):
        raise UserError(
            f"bad generator config (arch 'imagebert' or 'uvit', heads dividing the width): {cfg}"
        )
    return ImageBert(cfg) if cfg.arch == "imagebert" else UViTBert(cfg)


# ----------------------------------------------------------------------------------------------
# 6. Configs, the released presets and their sampling settings.


@dataclasses.dataclass
class GeneratorConfig:
    """A generator's architecture; the defaults are TiTok-L-32's (an ImageBert)."""

    arch: str = "imagebert"  # "imagebert" (post-LN BERT) or "uvit" (pre-LN U-ViT)
    codebook_size: int = 4096  # K: the tokenizer's codebook size; K is also the [MASK] id
    seq_len: int = 32  # N: image tokens per image (the tokenizer's num_latent_tokens)
    num_classes: int = 1000  # C: class labels; C itself is the null class
    hidden_size: int = 768
    num_layers: int = 24  # for "uvit": in-blocks = out-blocks = num_layers // 2, plus a mid-block
    num_heads: int = 16
    mlp_dim: int = 3072
    dropout: float = 0.1  # hidden dropout (ImageBert only; the reference U-ViT has none)
    attn_dropout: float = 0.1  # attention-probability dropout (ImageBert only)
    class_label_dropout: float = 0.1  # training: the probability of a label becoming null


# The released generators (official configs/infer/TiTok/*.yaml), and a CPU-sized one for the tiny
# tokenizer.
PRESETS: dict[str, GeneratorConfig] = {
    "titok_l32": GeneratorConfig(arch="imagebert", codebook_size=4096, seq_len=32),
    "titok_b64": GeneratorConfig(arch="imagebert", codebook_size=4096, seq_len=64),
    "titok_s128": GeneratorConfig(
        arch="uvit", codebook_size=4096, seq_len=128, hidden_size=1024, num_layers=20, mlp_dim=4096
    ),
    "tiny": GeneratorConfig(
        arch="imagebert",
        codebook_size=1024,
        seq_len=32,
        num_classes=10,
        hidden_size=192,
        num_layers=4,
        num_heads=4,
        mlp_dim=768,
    ),
}

# The official ImageNet settings (the released configs, and the eval script's softmax annealing),
# as `generate`'s keyword arguments. L-32, B-64 (and tiny) take 8 steps with a linear guidance
# schedule. The tiny one was chosen on main.sh's held-out statistics (docs/main-job.md).
LINEAR_8_STEPS = dict(num_steps=8, guidance_schedule="linear", softmax_annealing=True)
DEFAULT_SAMPLING: dict[str, dict] = {
    "titok_l32": dict(LINEAR_8_STEPS, guidance_scale=4.5, randomize_temperature=9.5),
    "titok_b64": dict(LINEAR_8_STEPS, guidance_scale=3.0, randomize_temperature=11.0),
    "titok_s128": dict(
        num_steps=64,
        guidance_scale=6.9,
        guidance_schedule="power-cosine",
        guidance_pow=3.0,
        randomize_temperature=2.8,
        softmax_annealing=True,
    ),
    "tiny": dict(LINEAR_8_STEPS, guidance_scale=2.0, randomize_temperature=3.0),
}

config_to_dict = dataclasses.asdict  # GeneratorConfig -> our checkpoints' "config"


def config_from_dict(d: dict) -> GeneratorConfig:
    """The inverse of config_to_dict (our checkpoints' "config"); build_generator checks it."""
    try:
        return GeneratorConfig(**d)
    except TypeError as e:  # an unknown field
        raise UserError(f"not a generator config ({e})") from None


def config_from_official(cfg: dict) -> GeneratorConfig:
    """The official config (YAML / HF config.json: model.vq_model, model.generator) as ours."""
    try:
        vq, g = cfg["model"]["vq_model"], cfg["model"]["generator"]
        return GeneratorConfig(
            arch={"ViT": "imagebert", "UViT": "uvit"}[g["model_type"]],
            codebook_size=int(vq["codebook_size"]),
            seq_len=int(g["image_seq_len"]),
            num_classes=int(g["condition_num_classes"]),
            # Early reference versions hard-coded the BERT size (768/24/16/3072), not read it.
            hidden_size=int(g.get("hidden_size", 768)),
            num_layers=int(g.get("num_hidden_layers", 24)),
            num_heads=int(g.get("num_attention_heads", 16)),
            mlp_dim=int(g.get("intermediate_size", 3072)),
            dropout=float(g.get("dropout", 0.1)),
            attn_dropout=float(g.get("attn_drop", 0.1)),
            class_label_dropout=float(g.get("class_label_dropout", 0.1)),
        )
    except KeyError as e:
        raise UserError(
            f"official generator config lacks {e} (expected model.vq_model and "
            "model.generator with model_type 'ViT' or 'UViT')"
        ) from None


# ----------------------------------------------------------------------------------------------
# 7. Loading: official checkpoints (strict) and our own.


def load_generator(path: str | Path) -> MaskedTokenModel:
    """A generator in eval mode from our checkpoint (EMA weights preferred), an official weights
    file (.bin / .safetensors; the preset recognised by the shapes) or a Hugging Face folder
    (config.json + the weights)."""
    path, preset = Path(path), None
    hub_weights = [path / n for n in ("model.safetensors", "pytorch_model.bin")]
    hub_weights = [w for w in hub_weights if w.is_file()]
    if hub_weights:
        cfg = config_from_official(common.read_json(path / "config.json"))
        state = common.read_checkpoint(hub_weights[0])
    else:
        state = common.read_checkpoint(path)  # a file, or a training run's folder
        if isinstance(state, dict) and "kind" in state:  # ours
            preset = state.get("preset")
            config, state = common.checkpoint_weights(state, "generator", path)
            cfg = config_from_dict(config)
        else:  # a bare official state dict: the preset names the architecture
            state = common.tensors_only(state, path, "generator weights")
            preset = common.guess_preset(state, PRESETS, build_generator)
            if preset is None:
                raise UserError(
                    f"{path}: weights match none of the generator presets ({', '.join(PRESETS)}); "
                    "use a snapshot folder with config.json or a checkpoint with its config"
                )
            cfg = PRESETS[preset]
    model = build_generator(cfg)
    common.load_official_weights(model, state)
    model.preset = preset or common.guess_preset(state, PRESETS, build_generator)
    return model.eval().requires_grad_(False)
