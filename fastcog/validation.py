"""Validation videos: render the configured prompts with the current weights.

Built on the diffusers pipelines, as the reference does (50 steps, CFG 6 by default), through
fastcog.render, which `fastcog sample` also renders with, and written as mp4 under
`<output_dir>/validation/`. Called once per optimizer step that is a multiple of
validation.every_steps (the reference fires repeatedly under gradient accumulation; fastcog
does not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastcog.config import Config
from fastcog.data.video import write_video
from fastcog.render import RenderSettings, conditioning_image, make_pipeline, render


@torch.no_grad()
def render_validation(cfg: Config, comps: Any, transformer: torch.nn.Module, out: Path, step: int,
                      device: torch.device, write: bool = True) -> list[Path]:
    """Render every validation prompt; returns the written mp4 paths.

    write=False renders without writing (under FSDP every rank must run the forwards, and
    only rank 0 keeps the videos).
    """
    v, d = cfg.validation, cfg.data
    comps.text_encoder.to(device)
    comps.vae.to(device)
    pipe = make_pipeline(comps, transformer, cfg.model.i2v_image_scale)
    settings = RenderSettings(num_frames=d.num_frames, height=d.height, width=d.width,
                              num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                              max_sequence_length=comps.variant.max_text_seq_length)
    was_training = transformer.training
    transformer.eval()
    written = []
    folder = out / "validation"
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    try:
        for i, prompt in enumerate(v.prompts):
            image = None
            if comps.variant.is_i2v:
                img_path = Path(v.images[i])
                if not img_path.is_absolute():
                    img_path = Path(d.data_root) / img_path
                image = conditioning_image(img_path, d.height, d.width)
            frames = render(pipe, prompt, settings, v.seed + i, dtype, image)
            if not write:
                continue
            path = folder / f"step-{step:06d}-prompt-{i}.mp4"
            write_video(path, frames, fps=v.fps)
            written.append(path)
    finally:
        transformer.train(was_training)
        comps.text_encoder.to("cpu")
    return written
