"""The loss and LoRA gradients in bf16 / fp16 against the reference trainer's formula.

The reference trainer runs the transformer through accelerate, which autocasts the forward and
converts its output to fp32; the noising runs in the latents' dtype, and the I2V image is noised
in fp32 and cast to the VAE's dtype afterwards. `reference_loss` below writes that out with
diffusers' own scheduler ops. fastcog's objective, run as the trainer runs it
(`make_objective` + `forward_backward`), must give the same loss and LoRA gradients on the same
model, with the same draws, at forced timesteps t in FORCED_T."""

from __future__ import annotations

import pytest
import torch

from fastcog.config import Config, FastConfig, LoraConfig, ModelConfig
from fastcog.lora import inject_lora
from fastcog.models import TORCH_DTYPES, load_components, read_variant
from fastcog.objective import RotaryCache, make_objective, pad_latent_frames
from fastcog.trainer import forward_backward
from fastcog.variants import VARIANTS

FORCED_T = (0, 1, 10, 100, 999)
# Relative tolerances (loss, LoRA gradient). The reference ops run the same ops in the same order
# as the formula below: measured identical on every variant and t, so 1e-6 (an I2V pixel noise
# drawn in bf16, ~1e-4 in the loss, fails it). The fused loss kernel reduces in another order
# with fp64 coefficients and returns the gradient in the compute dtype: measured up to 2.6e-5
# (loss, at t = 0) and 2.5e-3 (gradient).
RTOL = {"reference": (1e-6, 1e-6), "fused": (1e-4, 1e-2)}
# CPU autocast runs fp16 too; the 2B trains in fp16, the rest in bf16.
DTYPES = {name: ("fp16", "bf16") if name == "cogvideox-2b" else ("bf16",) for name in VARIANTS}
CASES = [(name, dtype) for name in VARIANTS for dtype in DTYPES[name]]


def reference_loss(transformer, scheduler, vae, variant, batch, t, dtype):
    """The reference trainer's compute_loss as accelerate runs it, timesteps forced to t."""
    latents = batch["latents"]
    image_latents = None
    if variant.is_i2v:
        images = batch["images"].unsqueeze(2)
        assert images.dtype == torch.float32
        sigma = torch.exp(torch.normal(mean=-3.0, std=0.5, size=(1,)))
        noisy_images = images + torch.randn_like(images) * sigma[:, None, None, None, None]
        sample = vae.encode(noisy_images.to(vae.dtype)).latent_dist.sample()
        scale = vae.config.scaling_factor
        image_latents = (sample / scale if vae.config.invert_scale_latents else sample * scale).permute(0, 2, 1, 3, 4)
    latents = pad_latent_frames(latents, variant.patch_size_t).permute(0, 2, 1, 3, 4)
    prompt_embeds = batch["prompt_embeds"].to(latents.dtype)
    noise = torch.randn_like(latents)
    noisy = scheduler.add_noise(latents, noise, t)  # in the latents' dtype: abar rounded to it
    model_input = noisy
    if image_latents is not None:
        pad = image_latents.new_zeros((latents.shape[0], latents.shape[1] - 1, *image_latents.shape[2:]))
        model_input = torch.cat([noisy, torch.cat([image_latents, pad], dim=1)], dim=2)
    rope = None
    if variant.use_rope:
        _, f, _, h, w = latents.shape
        rope = RotaryCache(variant)(f, h, w, latents.device)
    with torch.autocast("cpu", dtype=TORCH_DTYPES[dtype]):
        out = transformer(hidden_states=model_input, encoder_hidden_states=prompt_embeds, timestep=t,
                          ofs=latents.new_full((1,), 2.0) if variant.uses_ofs else None,
                          image_rotary_emb=rope, return_dict=False)[0]
    v_hat = out.float()  # accelerate's convert_outputs_to_fp32
    z0_hat = scheduler.get_velocity(v_hat, noisy, t)
    weights = (1 / (1 - scheduler.alphas_cumprod[t])).view(-1, 1, 1, 1, 1)
    return torch.mean((weights * (z0_hat - latents) ** 2).reshape(latents.shape[0], -1), dim=1).mean()


@pytest.fixture(scope="module")
def lora_model(tiny_checkpoint):
    """Per (variant, dtype): the tiny model in the compute dtype, LoRA in fp32 with random B."""
    built = {}

    def get(name: str, dtype: str):
        if (name, dtype) not in built:
            comps = load_components(tiny_checkpoint(name), dtype, parts=("transformer", "scheduler", "vae"))
            params = inject_lora(comps.transformer, LoraConfig(rank=4, alpha=4.0))
            g = torch.Generator().manual_seed(5)
            for n, p in comps.transformer.named_parameters():
                if "lora_B" in n:  # B = 0 would leave every A gradient zero
                    p.data = torch.randn(p.shape, generator=g) * 0.05
            built[name, dtype] = comps, params
        return built[name, dtype]

    return get


def make_batch(variant, dtype: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the data pipeline yields: latents and embeddings in the compute dtype, images in fp32."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        "latents": torch.randn(2, variant.latent_channels, 3, 8, 12, generator=g).to(TORCH_DTYPES[dtype]),
        "prompt_embeds": torch.randn(2, variant.max_text_seq_length, variant.text_embed_dim,
                                     generator=g).to(TORCH_DTYPES[dtype]),
    }
    if variant.is_i2v:
        batch["images"] = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1
    return batch


def grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    flat = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return flat


def fastcog_loss(comps, params, batch, t, dtype, fused):
    """fastcog's loss and LoRA gradients through the trainer's forward_backward, timesteps forced."""
    cfg = Config(model=ModelConfig(dtype=dtype), fast=FastConfig(fused_loss=fused))
    objective = make_objective(cfg, comps.variant, comps.scheduler, comps.vae)
    objective.randint_timesteps = lambda batch_size, device: t
    torch.manual_seed(11)
    loss = forward_backward(objective, comps.transformer, batch, cfg, grad_scaler=None)
    return loss, grads(params)


def expected_loss(comps, params, batch, t, dtype):
    torch.manual_seed(11)
    loss = reference_loss(comps.transformer, comps.scheduler, comps.vae, comps.variant, batch, t, dtype)
    loss.backward()
    return float(loss), grads(params)


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fused", [False, True], ids=["reference_ops", "fused_ops"])
@pytest.mark.parametrize("variant_name,dtype", CASES)
def test_low_precision_loss_and_grads_match_reference(lora_model, variant_name, dtype, fused):
    comps, params = lora_model(variant_name, dtype)
    batch = make_batch(comps.variant, dtype)
    for step in FORCED_T:
        t = torch.tensor([step, step])
        want_loss, want_grad = expected_loss(comps, params, batch, t, dtype)
        loss, grad = fastcog_loss(comps, params, batch, t, dtype, fused)
        assert want_loss > 0 and want_grad.abs().max() > 0, f"t={step}: the reference loss or gradient is 0"
        rtol_loss, rtol_grad = RTOL["fused" if fused else "reference"]
        assert rel(loss, want_loss) < rtol_loss, f"t={step}: loss {loss} vs reference {want_loss}"
        assert rel(grad, want_grad) < rtol_grad, f"t={step}: LoRA gradient off by {rel(grad, want_grad):.3g}"


def test_low_precision_prediction_is_not_used_for_the_loss(lora_model):
    """Control: the loss computed on the bf16 output (diffusers then rounds abar to bf16) is
    exactly 0 at t = 0, so the check above can tell the two apart."""
    comps, _ = lora_model("cogvideox-5b", "bf16")
    batch = make_batch(comps.variant, "bf16")
    t = torch.tensor([0, 0])
    latents = batch["latents"].permute(0, 2, 1, 3, 4)
    noisy = comps.scheduler.add_noise(latents, torch.randn_like(latents), t)
    v_hat = torch.randn_like(latents)  # a bf16 prediction
    z0_hat = comps.scheduler.get_velocity(v_hat, noisy, t)
    assert torch.equal(z0_hat, latents)
    assert float(comps.scheduler.get_velocity(v_hat.float(), noisy, t).sub(latents).abs().max()) > 0


def test_cached_images_stay_fp32(tmp_path):
    """The dataset hands the I2V image over in fp32 whatever the compute dtype: the reference
    draws and adds the pixel noise in fp32 and casts only the noised image."""
    from fastcog.data.cache import CachedDataset, CachedItem, save_atomic

    image = torch.rand(3, 64, 96) * 2 - 1
    save_atomic({"latents": torch.randn(16, 3, 8, 12)}, tmp_path / "latents.safetensors")
    save_atomic({"prompt_embeds": torch.randn(16, 32)}, tmp_path / "prompt.safetensors")
    save_atomic({"image": image}, tmp_path / "image.safetensors")
    item = CachedItem(tmp_path / "latents.safetensors", tmp_path / "prompt.safetensors", tmp_path / "image.safetensors")
    out = CachedDataset([item], torch.bfloat16)[0]
    assert out["latents"].dtype == torch.bfloat16 and out["prompt_embeds"].dtype == torch.bfloat16
    assert out["images"].dtype == torch.float32 and torch.equal(out["images"], image)


@pytest.mark.parametrize("flag", [True, False])
def test_vae_tiling_and_slicing_follow_the_config_for_the_step_encode(tiny_checkpoint, flag):
    """data.vae_tiling / vae_slicing (on by default, as the reference) reach the VAE that encodes
    the I2V image every step, not only the caching one."""
    from fastcog.config import DataConfig
    from fastcog.inputs import load_loop_components

    assert DataConfig().vae_tiling and DataConfig().vae_slicing
    path = tiny_checkpoint("cogvideox-5b-i2v")
    cfg = Config(model=ModelConfig(path=str(path), dtype="fp32"),
                 data=DataConfig(vae_tiling=flag, vae_slicing=flag))
    comps = load_loop_components(cfg, read_variant(path), torch.device("cpu"))
    assert comps.vae.use_tiling is flag and comps.vae.use_slicing is flag

