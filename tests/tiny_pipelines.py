"""Tiny randomly initialised diffusers components, built offline, and a smooth toy network with the diffusers
hand loop, shared by the integration tests."""

from __future__ import annotations

import json

import torch

SHAPE = (3, 4, 2, 2)
_W = torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3


def toy_net(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth float64 'network' of (x, network time). The time goes through float32 first, as in a UNet's time
    embedding, so the hand loop (float32 ``timesteps``) and ``dp.sample`` (float64 time input) see the same t."""
    t = torch.as_tensor(t).to(torch.float32).to(torch.float64).reshape(-1).expand(x.shape[0])
    h = x.to(torch.float64).reshape(x.shape[0], -1)
    out = torch.tanh(h @ _W + torch.sin(t[:, None] / 300.0 + torch.arange(16.0) / 7))
    return out.reshape(x.shape).to(x.dtype)


def hand_loop(s, x, net=toy_net, timesteps=None, **step_kwargs):
    """The loop every diffusers pipeline runs: one ``step`` per timestep."""
    for t in s.timesteps if timesteps is None else timesteps:
        x = s.step(net(x, t), t, x, **step_kwargs).prev_sample
    return x


def start_noise(seed=0, shape=SHAPE, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tiny_unet():
    """An unconditional UNet2DModel on 3x8x8 images (about 42k parameters)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def clip_tokenizer(tmp_path):
    """A CLIP tokenizer over a one-letter vocabulary written to tmp_path; returns (tokenizer, vocab size)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"),
                         model_max_length=16), len(vocab)


def tiny_stable_diffusion(tmp_path):
    """A Stable-Diffusion text-to-image pipeline of tiny random components (8x8 latents, PNDM scheduler)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab_size = clip_tokenizer(tmp_path)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        norm_num_groups=4, sample_size=16).eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
