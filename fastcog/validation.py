"""Validation videos: render the configured prompts with the current weights.

Built on the diffusers pipelines, as the reference does (50 steps, CFG 6 by default), through
fastcog.render, which `fastcog sample` also renders with. Called once per optimizer step that is
a multiple of validation.every_steps (the reference fires repeatedly under gradient
accumulation; fastcog does not). The cheap, deterministic signal of progress is the held-out
validation loss (fastcog.val_loss); the videos show what the numbers mean.

Each prompt gives `<output_dir>/validation/step-<step>-<i>-<prompt slug>.mp4` and is logged under
one tag per prompt, `validation/<i>-<slug>`, whose steps TensorBoard shows on a slider: to wandb
as the mp4, to TensorBoard as an animated GIF in its Images tab.

Under torchrun:
- DDP (or one process): the prompts are split across the ranks (prompt i on rank i % world_size),
  each rank renders and writes its share, and rank 0 logs them all. The output dir is on a
  filesystem every rank sees, as the checkpoints already require.
- FSDP: every forward is collective (each block gathers its weights from all ranks), so no rank
  can render alone: every rank renders every prompt, in step, and rank 0 writes and logs them.
Rendering runs under a forked RNG, so however many videos a rank rendered, every rank's training
RNG stays where it was (the sharded objective needs them equal: fastcog.objective.set_shard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastcog.config import Config
from fastcog.data.video import write_video
from fastcog.metrics import MetricsWriter, animated_gif
from fastcog.parallel import Parallel, all_gather_objects
from fastcog.render import RenderSettings, conditioning_image, make_pipeline, render, slug


@dataclass(frozen=True)
class RenderedVideo:
    """One validation video as written, with what the tracker needs."""

    index: int
    """The prompt's position in validation.prompts."""
    prompt: str
    path: Path
    gif: bytes | None = None
    """The video as an animated GIF, for TensorBoard (None when it is not the tracker)."""

    @property
    def tag(self) -> str:
        """The tracker's name for this prompt's videos: the same at every step."""
        return f"validation/{self.index:02d}-{slug(self.prompt)}"


def video_path(out: Path, step: int, index: int, prompt: str) -> Path:
    return out / "validation" / f"step-{step:06d}-{index:02d}-{slug(prompt)}.mp4"


def prompts_of_rank(num_prompts: int, par: Parallel) -> list[int]:
    """The prompts this rank renders: all under FSDP (collective forwards), else its share."""
    if par.strategy == "fsdp":
        return list(range(num_prompts))
    return list(range(par.world.rank, num_prompts, par.world.world_size))


@torch.no_grad()
def render_validation(cfg: Config, comps: Any, transformer: torch.nn.Module, out: Path, step: int,
                      device: torch.device, write: bool = True, indices: Sequence[int] | None = None,
                      gif: bool = False) -> list[RenderedVideo]:
    """Render the validation prompts at `indices` (default: all); returns the videos written.

    write=False renders without writing (under FSDP every rank must run the forwards, and only
    rank 0 keeps the videos). gif: also encode each video as an animated GIF (TensorBoard).
    """
    v, d = cfg.validation, cfg.data
    indices = range(len(v.prompts)) if indices is None else indices
    if not indices:
        return []
    comps.text_encoder.to(device)
    comps.vae.to(device)
    pipe = make_pipeline(comps, transformer, cfg.model.i2v_image_scale)
    settings = RenderSettings(num_frames=d.num_frames, height=d.height, width=d.width,
                              num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                              max_sequence_length=comps.variant.max_text_seq_length)
    was_training = transformer.training
    transformer.eval()
    written = []
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    try:
        for i in indices:
            prompt = v.prompts[i]
            image = None
            if comps.variant.is_i2v:
                img_path = Path(v.images[i])
                if not img_path.is_absolute():
                    img_path = Path(d.data_root) / img_path
                image = conditioning_image(img_path, d.height, d.width)
            frames = render(pipe, prompt, settings, v.seed + i, dtype, image)
            if not write:
                continue
            path = write_video(video_path(out, step, i, prompt), frames, fps=v.fps)
            written.append(RenderedVideo(i, prompt, path, animated_gif(frames, v.fps) if gif else None))
    finally:
        transformer.train(was_training)
        comps.text_encoder.to("cpu")
    return written


def run_validation(cfg: Config, comps: Any, par: Parallel, out: Path, step: int, metrics: MetricsWriter | None,
                   ) -> list[RenderedVideo]:
    """Render this rank's prompts (see the module docstring), then rank 0 logs every rank's videos.
    Every rank returns all the videos written, in prompt order."""
    write = par.strategy != "fsdp" or par.world.is_main
    devices = [par.device] if par.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        mine = render_validation(cfg, comps, par.module,  # never the DDP wrapper: no gradient sync
                                 out, step, par.device, write, prompts_of_rank(len(cfg.validation.prompts), par),
                                 gif=cfg.log.report_to == "tensorboard")
    videos = sorted((video for part in all_gather_objects(mine) for video in part),  # type: ignore[attr-defined]
                    key=lambda video: video.index)
    if metrics is not None:
        for video in videos:
            metrics.log_video(video.tag, video.path, step, video.gif)
    return videos
