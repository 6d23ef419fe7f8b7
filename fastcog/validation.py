"""Validation videos: render the configured prompts with the current weights.

Built on the diffusers pipelines, as the reference does (50 steps, CFG 6 by default), and
written as mp4 under `<output_dir>/validation/`. Called once per optimizer step that is a
multiple of validation.every_steps (the reference fires repeatedly under gradient
accumulation; fastcog does not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcog.config import Config
from fastcog.data.video import load_image, write_video


@torch.no_grad()
def render_validation(cfg: Config, comps: Any, transformer: torch.nn.Module, out: Path, step: int,
                      device: torch.device, write: bool = True) -> list[Path]:
    """Render every validation prompt; returns the written mp4 paths.

    write=False renders without writing (under FSDP every rank must run the forwards, and
    only rank 0 keeps the videos).
    """
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    v, d = cfg.validation, cfg.data
    is_i2v = comps.variant.is_i2v
    cls = CogVideoXImageToVideoPipeline if is_i2v else CogVideoXPipeline
    pipe = cls(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder.to(device), vae=comps.vae.to(device),
               transformer=transformer, scheduler=comps.scheduler)
    pipe.set_progress_bar_config(disable=True)
    was_training = transformer.training
    transformer.eval()
    written = []
    folder = out / "validation"
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    try:
        for i, prompt in enumerate(v.prompts):
            kwargs: dict[str, Any] = {}
            if is_i2v:
                img_path = Path(v.images[i])
                if not img_path.is_absolute():
                    img_path = Path(d.data_root) / img_path
                from PIL import Image

                img = (load_image(img_path, d.height, d.width) + 1) * 127.5
                kwargs["image"] = Image.fromarray(img.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                frames = pipe(
                    prompt=prompt, num_frames=d.num_frames, height=d.height, width=d.width,
                    num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                    generator=torch.Generator(device="cpu").manual_seed(v.seed + i), output_type="np",
                    max_sequence_length=comps.variant.max_text_seq_length, **kwargs,
                ).frames[0]
            if not write:
                continue
            path = folder / f"step-{step:06d}-prompt-{i}.mp4"
            write_video(path, (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), fps=v.fps)
            written.append(path)
    finally:
        transformer.train(was_training)
        comps.text_encoder.to("cpu")
    return written
