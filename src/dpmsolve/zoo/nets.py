"""Small networks for the shipped zoo models.

``DigitsUNet`` is a compact two-level U-Net for 1x8x8 images. It takes ``net(x, t, y)`` with ``x`` of shape
``(B, 1, 8, 8)`` scaled to ``[-1, 1]``, ``t`` the (fractional) DDPM train index in ``[0, 999]`` (what
``wrap_model(time_input="discrete")`` hands it) and ``y`` integer class labels in ``[0, num_classes]``, where
label ``num_classes`` is the "null" class used for classifier-free guidance. It returns the noise prediction.

``PatchesUNet`` is the unconditional U-Net of the ``patches`` model: 3x32x32 RGB in ``[-1, 1]``, three
downsampling levels (32 -> 16 -> 8 -> 4) with one residual block each way, self-attention at 4x4, called as
``net(x, t)`` with ``t = 1000 t_schedule`` (``time_input="1000t"``); it returns the v-prediction.

Both run in float16 / bfloat16 too (``net.to(torch.bfloat16)``): the time embedding is computed in float32 and
handed to the network in its dtype, and the output layer runs in at least float32, so the prediction comes
back in float32 (``wrap_model`` converts it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape ``(B, dim)``, in ``dtype`` (default: at
    least float32).

    The phases are computed in at least float32 (half precision would round train step 776.3 to 776 and
    lose the high frequencies' phase); only the result is cast, so an fp16 / bf16 network gets an accurate
    embedding in its own dtype."""
    half = dim // 2
    work = torch.promote_types(t.dtype, torch.float32)           # float32, or float64 for a float64 network
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=work, device=t.device) / half)
    args = t.to(work)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype or work)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with a FiLM (scale, shift) conditioning on the embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


def _output_head(norm: nn.GroupNorm, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """GroupNorm-SiLU-conv output layer in at least float32: a half-precision prediction would be rounded to 3
    digits (bf16) before the sampler divides it by alpha (up to ~150x at a DDPM's t_max)."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    h = F.group_norm(h.to(dtype), norm.num_groups, norm.weight.to(dtype), norm.bias.to(dtype), norm.eps)
    return F.conv2d(F.silu(h), conv.weight.to(dtype), conv.bias.to(dtype), padding=conv.padding)


class DigitsUNet(nn.Module):
    """A class-conditional U-Net for 1x8x8 images: 8x8 (ch) -> 4x4 (2 ch) -> 2x2 (2 ch) and back, with skips."""

    def __init__(self, num_classes: int = 10, ch: int = 32, emb_dim: int = 128, in_channels: int = 1):
        super().__init__()
        self.num_classes = num_classes
        self.null_class = num_classes
        self.ch, self.emb_dim, self.in_channels = ch, emb_dim, in_channels
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
        c1, c2 = ch, 2 * ch
        self.conv_in = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)                     # 8x8
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)     # -> 4x4
        self.down2 = ResBlock(c1, c2, emb_dim)                     # 4x4
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)     # -> 2x2
        self.mid1 = ResBlock(c2, c2, emb_dim)
        self.mid2 = ResBlock(c2, c2, emb_dim)
        self.up2 = ResBlock(c2 + c2, c2, emb_dim)                  # 4x4
        self.up1 = ResBlock(c2 + c1, c1, emb_dim)                  # 8x8
        self.out = ResBlock(c1 + c1, c1, emb_dim)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        emb = self.time_mlp(timestep_embedding(t, self.ch, dtype=self.conv_in.weight.dtype))
        emb = emb + self.label_emb(y.long())
        emb = F.silu(emb)
        h0 = self.conv_in(x)
        h1 = self.down1(h0, emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.pool2(h2)
        h = self.mid2(self.mid1(h, emb), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up2(torch.cat([h, h2], 1), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], 1), emb)
        h = self.out(torch.cat([h, h0], 1), emb)
        return _output_head(self.norm_out, self.conv_out, h)


class DigitsClassifier(nn.Module):
    """A small CNN classifier of 1x8x8 digits in ``[-1, 1]``: returns logits; ``features(x)`` gives the
    penultimate-layer activations (``feat_dim`` values) used by :func:`dpmsolve.zoo.metrics.digits_fd`."""

    def __init__(self, num_classes: int = 10, ch: int = 32, feat_dim: int = 64):
        super().__init__()
        self.num_classes, self.ch, self.feat_dim = num_classes, ch, feat_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU(),
            nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * ch), nn.SiLU(),   # 4x4
            nn.Conv2d(2 * ch, 2 * ch, 3, padding=1), nn.GroupNorm(8, 2 * ch), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * ch * 16, feat_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a (small) feature map, residual, zero-initialised output."""

    def __init__(self, ch: int, groups: int = 8):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)      # (b, hw, hw)
        return x + self.proj((v @ attn.transpose(1, 2)).reshape(b, c, h, w))


class PatchesUNet(nn.Module):
    """An unconditional U-Net for 3x32x32 images: levels of ``ch * mults[i]`` channels at 32, 16, 8 and 4 pixels
    (the last is the middle: two residual blocks around self-attention), one residual block per level each way,
    skip connections, strided-conv downsampling and nearest upsampling."""

    def __init__(self, ch: int = 32, mults=(1, 2, 3, 3), emb_dim: int = 128, in_channels: int = 3):
        super().__init__()
        self.ch, self.emb_dim, self.in_channels, self.mults = ch, emb_dim, in_channels, tuple(mults)
        widths = [ch * m for m in mults]
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.downs, self.pools = nn.ModuleList(), nn.ModuleList()
        cin = widths[0]
        for w in widths[:-1]:
            self.downs.append(ResBlock(cin, w, emb_dim))
            self.pools.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            cin = w
        self.mid1 = ResBlock(cin, widths[-1], emb_dim)
        self.attn = SelfAttention(widths[-1])
        self.mid2 = ResBlock(widths[-1], widths[-1], emb_dim)
        self.ups = nn.ModuleList()
        cin = widths[-1]
        for w in reversed(widths[:-1]):
            self.ups.append(ResBlock(cin + w, w, emb_dim))
            cin = w
        self.out = ResBlock(cin + widths[0], widths[0], emb_dim)
        self.norm_out = nn.GroupNorm(8, widths[0])
        self.conv_out = nn.Conv2d(widths[0], in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.ch, dtype=self.conv_in.weight.dtype)))
        h0 = h = self.conv_in(x)
        skips = []
        for block, pool in zip(self.downs, self.pools):
            h = block(h, emb)
            skips.append(h)
            h = pool(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for block in self.ups:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], 1), emb)
        h = self.out(torch.cat([h, h0], 1), emb)
        return _output_head(self.norm_out, self.conv_out, h)


ARCHITECTURES = {"DigitsUNet": DigitsUNet, "DigitsClassifier": DigitsClassifier, "PatchesUNet": PatchesUNet}
