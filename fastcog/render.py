"""Rendering one video with the diffusers CogVideoX pipelines.

Shared by the validation videos written during training (fastcog.validation) and by
`fastcog sample` (fastcog.sample): the same weights, prompt, image, seed and settings give the
same frames in both. The noise comes from a CPU generator, so a GPU and a CPU draw the same
starting latents.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcog.data.video import load_image


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt, for the names of sampled and validation videos:
    lowercase words joined by '-'."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:limit].rstrip("-") or "prompt"


@dataclass(frozen=True)
class RenderSettings:
    """What every video of one sampling or validation pass shares."""

    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int
    """The transformer's text length (fastcog.variants.VariantSpec.max_text_seq_length): the
    pipeline pads prompts to it, and the model was trained on prompts of that length."""


def make_pipeline(comps: Any, transformer: torch.nn.Module, i2v_image_scale: str = "pipeline") -> Any:
    """The T2V or I2V pipeline over loaded components (fastcog.models.Components) and `transformer`.

    i2v_image_scale is model.i2v_image_scale, the setting the model was trained with: CogVideoX
    1.5's VAE has invert_scale_latents, and the pipeline then divides the image latents by the
    VAE scale; a model trained with `reference` saw them multiplied, and is sampled that way.
    """
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    cls = CogVideoXImageToVideoPipeline if comps.variant.is_i2v else CogVideoXPipeline
    pipe = cls(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
               transformer=transformer, scheduler=comps.scheduler)
    pipe.set_progress_bar_config(disable=True)  # callers show their own progress
    if comps.variant.is_i2v and i2v_image_scale == "reference" and comps.vae.config.invert_scale_latents:
        _multiply_image_latents(pipe)
    return pipe


def _multiply_image_latents(pipe: Any) -> None:
    """Make the I2V pipeline multiply 1.5's image latents by the VAE scale instead of dividing.

    prepare_latents returns them already divided by the scale; times scale**2 that is the
    multiplied value the `reference` objective trains on (fastcog.objective.encode_image), and
    the zero padding frames stay zero.
    """
    prepare = pipe.prepare_latents
    factor = pipe.vae_scaling_factor_image ** 2

    def prepare_latents(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        latents, image_latents = prepare(*args, **kwargs)
        return latents, image_latents * factor

    pipe.prepare_latents = prepare_latents


def conditioning_image(path: Path, height: int, width: int) -> Any:
    """An I2V condition as the PIL image the pipeline takes, resized to the video's size the way
    training resizes images (fastcog.data.video.load_image)."""
    from PIL import Image

    pixels = (load_image(path, height, width) + 1) * 127.5
    return Image.fromarray(pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


@torch.no_grad()
def render(pipe: Any, prompt: str, settings: RenderSettings, seed: int, dtype: torch.dtype, image: Any = None,
           on_step: Callable[[], None] | None = None) -> np.ndarray:
    """One video as uint8 frames [F, H, W, 3] (RGB), ready for fastcog.data.video.write_video.

    dtype is the dtype the frozen weights are stored in: the forward autocasts to it, as training
    does, so fp32 LoRA weights next to bf16 base weights run in bf16. `image`: the I2V condition
    (conditioning_image). `on_step` is called after each sampler step (a progress bar).
    """
    kwargs: dict[str, Any] = {}
    if image is not None:
        kwargs["image"] = image
    if on_step is not None:
        def step_end(_pipe: Any, _i: int, _t: Any, _tensors: dict) -> dict:
            on_step()
            return {}  # nothing replaced: the pipeline keeps its own latents

        kwargs["callback_on_step_end"] = step_end
    device = pipe._execution_device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        frames = pipe(
            prompt=prompt, num_frames=settings.num_frames, height=settings.height, width=settings.width,
            num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np",
            max_sequence_length=settings.max_sequence_length, **kwargs,
        ).frames[0]
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
