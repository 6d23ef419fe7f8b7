"""The reference objective against an independent float64 re-derivation, for every variant.

The transformer is the real tiny CogVideoX of each variant, wrapped to record what the
objective fed it and what it returned; the loss is then recomputed in float64 from scratch
(our own schedule, our own add_noise / get_velocity / weighting) and must match.
"""

from __future__ import annotations

import pytest
import torch

from fastcog.models import load_components
from fastcog.objective import Objective, pad_latent_frames
from fastcog.variants import VARIANTS


class Recorder(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[dict, torch.Tensor]] = []

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        self.calls.append((kwargs, out[0]))
        return out


def abar_float64(snr_shift_scale: float, n: int = 1000) -> torch.Tensor:
    """The CogVideoX schedule in float64: scaled_linear betas, SNR shift, then zero terminal SNR.

    Note the order: the diffusers scheduler applies the SD3-style SNR shift *before* the
    zero-terminal-SNR rescale; the scheduler is what the reference trainer runs, so it is the spec.
    """
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    abar = abar / (snr_shift_scale + (1 - snr_shift_scale) * abar)
    s = abar.sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])  # shift so sqrt(abar_T) = 0, keep sqrt(abar_0)
    return s**2


def make_batch(variant, batch_size: int = 2, frames: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "latents": torch.randn(batch_size, variant.latent_channels, frames, 8, 12, generator=g),
        "prompt_embeds": torch.randn(batch_size, variant.max_text_seq_length, variant.text_embed_dim, generator=g),
    }
    if variant.is_i2v:
        batch["images"] = torch.rand(batch_size, 3, 64, 96, generator=g) * 2 - 1
    return batch


@pytest.fixture(scope="module")
def components(tiny_checkpoint):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_components(tiny_checkpoint(name), "fp32")
        return cache[name]

    return get


@pytest.mark.parametrize("variant_name", VARIANTS)
def test_schedule_matches_float64_derivation(components, variant_name):
    comps = components(variant_name)
    shift = comps.scheduler.config.snr_shift_scale
    ours = abar_float64(shift)
    theirs = comps.scheduler.alphas_cumprod
    assert theirs.dtype == torch.float64
    assert theirs[-1] == 0 and ours[-1] == 0
    torch.testing.assert_close(theirs, ours, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("variant_name", VARIANTS)
def test_loss_matches_float64_rederivation(components, variant_name):
    comps = components(variant_name)
    v = comps.variant
    batch = make_batch(v)
    recorder = Recorder(comps.transformer)
    objective = Objective(v, comps.scheduler, comps.vae)

    torch.manual_seed(123)
    loss = objective(recorder, batch)
    (kwargs, v_hat), = recorder.calls

    z0 = pad_latent_frames(batch["latents"], v.patch_size_t).permute(0, 2, 1, 3, 4).double()
    model_input = kwargs["hidden_states"].double()
    c = v.latent_channels
    x_t = model_input[:, :, :c]
    t = kwargs["timestep"]
    assert t.dtype == torch.int64 and t.shape == (2,) and int(t.min()) >= 0 and int(t.max()) < 1000

    abar = abar_float64(comps.scheduler.config.snr_shift_scale)[t].view(-1, 1, 1, 1, 1)
    if not v.is_i2v:
        # Replay the documented draw order (timesteps, then noise) and check add_noise.
        torch.manual_seed(123)
        t_again = torch.randint(0, 1000, (2,))
        # randn_like on the *permuted* (non-contiguous) latents, as the reference does: torch
        # fills a strided tensor with other values than a contiguous one of the same shape.
        eps = torch.randn_like(pad_latent_frames(batch["latents"], v.patch_size_t).permute(0, 2, 1, 3, 4)).double()
        assert torch.equal(t_again, t)
        torch.testing.assert_close(x_t, abar.sqrt() * z0 + (1 - abar).sqrt() * eps, rtol=1e-5, atol=1e-5)
    z0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * v_hat.double()
    expected = ((z0_hat - z0) ** 2 / (1 - abar)).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0)

    # The identity the fused kernels rely on: the weighted x0 loss is the v-prediction MSE.
    eps_implied = (x_t - abar.sqrt() * z0) / (1 - abar).sqrt()
    v_target = abar.sqrt() * eps_implied - (1 - abar).sqrt() * z0
    torch.testing.assert_close(((v_hat.double() - v_target) ** 2).mean(), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("variant_name", VARIANTS)
def test_variant_specific_inputs(components, variant_name):
    comps = components(variant_name)
    v = comps.variant
    batch = make_batch(v)
    recorder = Recorder(comps.transformer)
    torch.manual_seed(0)
    Objective(v, comps.scheduler, comps.vae)(recorder, batch)
    (kwargs, v_hat), = recorder.calls
    hidden = kwargs["hidden_states"]
    frames = 4 if v.patch_size_t else 3  # 1.5: one copy of latent frame 0 prepended (3 -> 4)
    assert hidden.shape == (2, frames, 2 * v.latent_channels if v.is_i2v else v.latent_channels, 8, 12)
    assert v_hat.shape == (2, frames, v.latent_channels, 8, 12)
    if v.is_i2v:
        image_part = hidden[:, :, v.latent_channels :]
        assert image_part[:, 0].abs().sum() > 0
        assert torch.count_nonzero(image_part[:, 1:]) == 0  # zero padding after the image frame
    if v.uses_ofs:
        assert kwargs["ofs"].tolist() == [2.0]
    else:
        assert kwargs["ofs"] is None
    rope = kwargs["image_rotary_emb"]
    if v.use_rope:
        tokens = (frames // (v.patch_size_t or 1)) * (8 // 2) * (12 // 2)
        assert rope[0].shape == (tokens, v.attention_head_dim) and rope[1].shape == rope[0].shape
    else:
        assert rope is None


def test_pad_latent_frames_prepends_frame_zero():
    x = torch.arange(2 * 1 * 21 * 1 * 1, dtype=torch.float32).view(2, 1, 21, 1, 1)
    y = pad_latent_frames(x, 2)
    assert y.shape[2] == 22
    assert torch.equal(y[:, :, 0], x[:, :, 0]) and torch.equal(y[:, :, 1:], x)
    assert pad_latent_frames(x, None) is x


def test_i2v_image_scale_switch(components):
    """1.5-I2V: `pipeline` divides the image latents by the VAE scale, `reference` multiplies."""
    comps = components("cogvideox1.5-5b-i2v")
    v = comps.variant
    scale = comps.vae.config.scaling_factor
    assert comps.vae.config.invert_scale_latents
    images = make_batch(v)["images"]
    got = {}
    for mode in ("pipeline", "reference"):
        torch.manual_seed(7)
        got[mode] = Objective(v, comps.scheduler, comps.vae, i2v_image_scale=mode).encode_image(images)
    torch.testing.assert_close(got["pipeline"] * scale * scale, got["reference"], rtol=1e-5, atol=1e-6)


def test_rope_is_cached(components):
    comps = components("cogvideox-5b")
    objective = Objective(comps.variant, comps.scheduler)
    x = torch.zeros(1, 3, 16, 8, 12)
    assert objective.rotary_emb(x)[0] is objective.rotary_emb(x)[0]


def test_bf16_loss_close_to_fp32(tiny_checkpoint):
    """bf16 weights with a bf16 transformer forward give the fp32 loss within bf16 rounding."""
    losses = {}
    for dtype in ("fp32", "bf16"):
        comps = load_components(tiny_checkpoint("cogvideox-5b"), dtype, parts=("transformer", "scheduler"))
        batch = {k: v.to(comps.transformer.dtype) for k, v in make_batch(comps.variant).items()}
        torch.manual_seed(3)
        objective = Objective(comps.variant, comps.scheduler, compute_dtype=comps.transformer.dtype)
        losses[dtype] = float(objective(comps.transformer, batch))
    assert losses["fp32"] > 0
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.05


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("variant_name", ["cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"])
def test_sharded_draws_reproduce_one_process(components, variant_name, world_size):
    """Rank r of N with batch b draws slice r of what one process with batch N*b draws
    (timesteps, latent noise, and for I2V the image noise and the VAE sample), so the model
    sees the same inputs and the mean of the ranks' losses is the one-process loss."""
    comps = components(variant_name)
    batch = make_batch(comps.variant, batch_size=4)
    recorder = Recorder(comps.transformer)
    torch.manual_seed(1)
    whole = Objective(comps.variant, comps.scheduler, comps.vae)(recorder, batch)
    whole_inputs, _ = recorder.calls[0]
    b = 4 // world_size
    losses = []
    for rank in range(world_size):
        objective = Objective(comps.variant, comps.scheduler, comps.vae)
        objective.set_shard(rank, world_size)
        torch.manual_seed(1)  # every rank holds the same RNG state
        losses.append(objective(recorder, {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}))
        inputs, _ = recorder.calls[-1]
        assert torch.equal(inputs["timestep"], whole_inputs["timestep"][rank * b:(rank + 1) * b])
        # The draws are bit-identical; the I2V image latents differ by up to ~4e-6 because the
        # VAE's fp32 convolutions sum in a batch-size-dependent order (values are O(1); a wrong
        # draw differs by O(1), see the control below).
        torch.testing.assert_close(inputs["hidden_states"], whole_inputs["hidden_states"][rank * b:(rank + 1) * b],
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(losses).mean(), whole, rtol=1e-6, atol=0)


def test_unsharded_draws_differ_between_ranks(components):
    """Control: without set_shard, slicing the batch changes the draws (the test above can fail)."""
    comps = components("cogvideox-5b")
    batch = make_batch(comps.variant, batch_size=4)
    recorder = Recorder(comps.transformer)
    torch.manual_seed(1)
    Objective(comps.variant, comps.scheduler)(recorder, batch)
    torch.manual_seed(1)
    Objective(comps.variant, comps.scheduler)(recorder, {k: v[2:] for k, v in batch.items()})
    assert not torch.equal(recorder.calls[1][0]["hidden_states"], recorder.calls[0][0]["hidden_states"][2:])
