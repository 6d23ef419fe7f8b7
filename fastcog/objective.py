"""The diffusion training objective (docs/reference.md, "Scheduler and objective").

One `Objective` computes the loss as the reference trainer's `compute_loss` does: the same RNG
draws in one fixed order (I2V: image-noise sigma, image noise, VAE sample; then timesteps; then
latent noise), the same conditioning, the same precision. The two elementwise steps, the
noising and the velocity loss, come from an `ObjectiveOps`: `REFERENCE_OPS` (the diffusers
scheduler's own `add_noise` / `get_velocity`, the parity target) or `fused_ops()` (the fused
loss kernel, `fastcog.fast.objective`). Same inputs, same draws, so the same loss.

Precision, as the reference runs it: only the transformer forward runs under autocast, and its
output is used in fp32 (accelerate converts a wrapped model's outputs to fp32), so the loss is
never computed on a bf16 prediction; fed one, diffusers' `get_velocity` would round
`alphas_cumprod` to bf16, and at t = 0, 1 abar becomes 1.0, the loss and its gradient exactly 0.
Noising runs in the latents' dtype, outside autocast, as in the reference.

Batch layout (what the data pipeline yields):
  latents        [B, C, F, H, W]  VAE latents in the compute dtype, already scaled by the VAE factor
  prompt_embeds  [B, L, D]        T5 embeddings, padded to the transformer's max_text_seq_length
  images         [B, 3, H*8, W*8] I2V only: the conditioning image in [-1, 1], fp32
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastcog.models import TORCH_DTYPES
from fastcog.variants import VariantSpec


def pad_latent_frames(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """CogVideoX 1.5: prepend copies of latent frame 0 so F divides by patch_size_t.

    latents [B, C, F, H, W]. The reference prepends `F % patch_t` copies, which makes F a
    multiple of patch_t only for patch_t = 2 (the one value used); kept as written.
    """
    if patch_size_t is None:
        return latents
    ncopy = latents.shape[2] % patch_size_t
    if ncopy == 0:
        return latents
    first = latents[:, :, :1]
    return torch.cat([first.repeat(1, 1, ncopy, 1, 1), latents], dim=2)


class RotaryCache:
    """3D RoPE (cos, sin) for a latent grid, computed once per shape and device.

    The reference recomputes it every step; it depends only on (F, H, W), so caching gives
    the same tensors without the per-step cost.
    """

    def __init__(self, variant: VariantSpec) -> None:
        self.variant = variant
        self._cache: dict[tuple[int, int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, frames: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """frames, height, width: latent grid size (after 1.5 frame padding)."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        key = (frames, height, width, str(device))
        if key not in self._cache:
            v = self.variant
            grid_h, grid_w = height // v.patch_size, width // v.patch_size
            temporal = frames if v.patch_size_t is None else (frames + v.patch_size_t - 1) // v.patch_size_t
            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=v.attention_head_dim,
                crops_coords=None,
                grid_size=(grid_h, grid_w),
                temporal_size=temporal,
                grid_type="slice",
                max_size=(grid_h, grid_w),
                device=device,
            )
            self._cache[key] = (cos, sin)
        return self._cache[key]


def velocity_loss_from_scheduler(
    scheduler: Any, v_hat: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Objective step 8 (docs/reference.md) with the scheduler's own get_velocity, as the reference computes it."""
    z0_hat = scheduler.get_velocity(v_hat, noisy, timesteps)
    abar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    weights = 1 / (1 - abar)
    while weights.ndim < z0_hat.ndim:
        weights = weights.unsqueeze(-1)
    per_sample = torch.mean((weights * (z0_hat - latents) ** 2).reshape(latents.shape[0], -1), dim=1)
    return per_sample.mean()


@dataclass(frozen=True)
class ObjectiveOps:
    """The two elementwise steps an objective can swap; everything else is shared."""

    name: str
    add_noise: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(scheduler, latents, noise, timesteps) -> x_t, in the latents' dtype."""
    velocity_loss: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(scheduler, v_hat, x_t, latents, timesteps) -> the 0-dim loss."""
    reads_low_precision_output: bool
    """True: the loss takes the transformer's bf16/fp16 output as it is and upcasts each value
    as it reads it (a fused kernel); False: the output is first copied to fp32."""


def _scheduler_add_noise(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor) -> torch.Tensor:
    return scheduler.add_noise(latents, noise, timesteps)


REFERENCE_OPS = ObjectiveOps("reference", _scheduler_add_noise, velocity_loss_from_scheduler,
                             reads_low_precision_output=False)


def fused_ops() -> ObjectiveOps:
    """The fused loss kernel (imported on first use: it needs triton); the reference noising."""
    from fastcog.fast.objective import fused_velocity_loss

    return ObjectiveOps("fused", _scheduler_add_noise, fused_velocity_loss, reads_low_precision_output=True)


class Objective:
    """The reference trainer's loss, with the noising and loss steps from `ops`."""

    def __init__(
        self,
        variant: VariantSpec,
        scheduler: Any,
        vae: Any = None,
        i2v_image_scale: str = "pipeline",
        compute_dtype: torch.dtype = torch.float32,
        ops: ObjectiveOps = REFERENCE_OPS,
    ) -> None:
        """compute_dtype: the autocast dtype of the transformer forward (fp32: no autocast)."""
        if variant.is_i2v and vae is None:
            raise ValueError("an I2V objective needs the VAE: the conditioning image is encoded every step")
        self.variant = variant
        self.scheduler = scheduler
        self.vae = vae
        self.i2v_image_scale = i2v_image_scale
        self.compute_dtype = compute_dtype
        self.ops = ops
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.rotary = RotaryCache(variant) if variant.use_rope else None
        self.rank, self.world_size = 0, 1

    def set_shard(self, rank: int, world_size: int) -> None:
        """Under torchrun: this rank's micro-batch is slice `rank` of a global batch.

        Every rank then draws the timesteps and noise of the *whole* global batch (all ranks
        hold the same RNG state) and keeps its own slice, so N ranks x batch b draw exactly what
        one process with batch N*b draws: the same losses whatever the number of ranks.
        """
        self.rank, self.world_size = rank, world_size

    def _mine(self, global_draw: torch.Tensor, local_batch: int) -> torch.Tensor:
        return global_draw[self.rank * local_batch:(self.rank + 1) * local_batch]

    def randn_like(self, x: torch.Tensor, contiguous_perm: tuple[int, ...] | None = None) -> torch.Tensor:
        """torch.randn_like(x), drawn for the global batch when sharded.

        randn_like fills memory in storage order, so for a permuted view the global template
        must have the same layout: `contiguous_perm` is the permutation that made x from a
        contiguous tensor (None: x is contiguous).
        """
        if self.world_size == 1:
            return torch.randn_like(x)
        b = x.shape[0]
        if contiguous_perm is None:
            template = x.new_empty((b * self.world_size, *x.shape[1:]))
        else:
            inverse = [contiguous_perm.index(d) for d in range(x.ndim)]
            base_shape = [x.shape[inverse[d]] for d in range(x.ndim)]
            base_shape[0] = b * self.world_size
            template = x.new_empty(base_shape).permute(*contiguous_perm)
        return self._mine(torch.randn_like(template), b)

    def randint_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        t = torch.randint(0, self.num_train_timesteps, (batch_size * self.world_size,), device=device).long()
        return self._mine(t, batch_size)

    def vae_sample(self, dist: Any) -> torch.Tensor:
        """latent_dist.sample(), drawn for the global batch when sharded (same formula as diffusers)."""
        if self.world_size == 1:
            return dist.sample()
        mean = dist.mean
        noise = torch.randn((mean.shape[0] * self.world_size, *mean.shape[1:]), dtype=mean.dtype, device=mean.device)
        return mean + dist.std * self._mine(noise, mean.shape[0])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> noisy-image latents [B, 1, C, h, w] (the I2V condition).

        Pixel noise sigma = exp(N(-3, 0.5)), one scalar for the batch, then a VAE sample.
        CogVideoX 1.5's VAE has invert_scale_latents: the diffusers pipeline then *divides* the
        image latents by the scale at inference, while the reference trainer multiplies
        (docs/reference.md, bugs table); `i2v_image_scale` picks which.
        """
        vae = self.vae
        images = images.float().unsqueeze(2)  # [B, 3, 1, H, W]; noised in fp32, cast after noising
        sigma = torch.exp(torch.normal(mean=-3.0, std=0.5, size=(1,), device=images.device))
        noisy = images + self.randn_like(images) * sigma[:, None, None, None, None]
        sample = self.vae_sample(vae.encode(noisy.to(vae.dtype)).latent_dist)
        scale = vae.config.scaling_factor
        if getattr(vae.config, "invert_scale_latents", False) and self.i2v_image_scale == "pipeline":
            latents = sample / scale
        else:
            latents = sample * scale
        return latents.permute(0, 2, 1, 3, 4)

    def rotary_emb(self, latents_bfchw: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        if self.rotary is None:
            return None
        _, f, _, h, w = latents_bfchw.shape
        return self.rotary(f, h, w, latents_bfchw.device)

    def __call__(self, transformer: torch.nn.Module, batch: dict[str, torch.Tensor],
                 timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The per-batch loss (a 0-dim tensor, float64 as in the reference: w is float64).

        timesteps: [B] fixed timesteps instead of drawn ones (the validation loss, fastcog.val_loss);
        every other draw still comes from the global RNG, in the same order.
        """
        v = self.variant
        latents = batch["latents"]
        image_latents = self.encode_image(batch["images"]) if v.is_i2v else None

        latents = pad_latent_frames(latents, v.patch_size_t)
        batch_size = latents.shape[0]
        prompt_embeds = batch["prompt_embeds"].to(latents.dtype)
        latents = latents.permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]

        if timesteps is None:
            timesteps = self.randint_timesteps(batch_size, latents.device)
        noise = self.randn_like(latents, contiguous_perm=(0, 2, 1, 3, 4))
        noisy = self.ops.add_noise(self.scheduler, latents, noise, timesteps)

        model_input = noisy
        if image_latents is not None:
            pad = image_latents.new_zeros((batch_size, latents.shape[1] - 1, *image_latents.shape[2:]))
            model_input = torch.cat([noisy, torch.cat([image_latents, pad], dim=1)], dim=2)
        ofs = latents.new_full((1,), 2.0) if v.uses_ofs else None

        with self.autocast(model_input.device):
            v_hat = transformer(
                hidden_states=model_input,
                encoder_hidden_states=prompt_embeds,
                timestep=timesteps,
                ofs=ofs,
                image_rotary_emb=self.rotary_emb(latents),
                return_dict=False,
            )[0]
        if not self.ops.reads_low_precision_output:
            v_hat = v_hat.float()
        return self.ops.velocity_loss(self.scheduler, v_hat, noisy, latents, timesteps)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The transformer forward's autocast (fp32 LoRA weights meet low-precision activations)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)


def make_objective(cfg: Any, variant: VariantSpec, scheduler: Any, vae: Any = None) -> Objective:
    """The configured objective: fused kernels when cfg.fast.fused_loss, else the reference ops."""
    ops = fused_ops() if cfg.fast.fused_loss else REFERENCE_OPS
    return Objective(variant, scheduler, vae, cfg.model.i2v_image_scale, TORCH_DTYPES[cfg.model.dtype], ops)
