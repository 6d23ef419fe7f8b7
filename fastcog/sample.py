"""`fastcog sample`: render videos from a trained run, to see what the LoRA (or fine-tune) does.

The weights come from fastcog.sample_source (a run folder, a checkpoint, or --model / --lora);
each video is rendered by fastcog.render, the code validation renders with, and written as an
mp4 by fastcog.data.video.write_video (no OpenCV) next to a PNG contact sheet of a few of its
frames, so the result can be looked at without a video player.

Under torchrun each rank renders every world_size-th prompt on its own GPU. A prompt's seed is
`--seed` plus its place in the list, as validation seeds its prompts, so a prompt gets the same
noise whichever rank draws it and however many there are (the video is the same up to float
rounding, which on CPUs can differ from one render to the next).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastcog.config_schema import ValidationConfig
from fastcog.config_validate import PIXEL_MULTIPLE
from fastcog.data.video import write_video
from fastcog.errors import ConfigError, DataError
from fastcog.parallel import World, all_gather_objects, device_for, init_distributed
from fastcog.render import RenderSettings, conditioning_image, make_pipeline, render, slug
from fastcog.sample_source import Source, load_lora, load_transformer, resolve_source
from fastcog.variants import VAE_SPATIAL_FACTOR

_DEFAULTS = ValidationConfig()  # steps, guidance, seed and fps default as the validation videos do
SHEET_FRAMES = 4
"""Frames per video on its contact sheet: the first, the last and evenly between."""
SHEET_HEIGHT = 240
"""Contact-sheet frames taller than this are scaled down (a 768 x 1360 video stays readable)."""


@dataclass(frozen=True)
class SampleOptions:
    """What `fastcog sample` is asked for (the CLI's arguments); None means "from the run"."""

    run: str | None = None
    model: str | None = None
    lora: str | None = None
    lora_scale: float | None = None
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    images: tuple[str, ...] = ()
    steps: int = _DEFAULTS.num_inference_steps
    guidance_scale: float = _DEFAULTS.guidance_scale
    seed: int = _DEFAULTS.seed
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int = _DEFAULTS.fps
    out: str | None = None
    dtype: str | None = None
    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Job:
    """One video: its place in the prompt list (which sets its seed and file name)."""

    index: int
    prompt: str
    image: Path | None = None


@dataclass
class SampleResult:
    videos: list[Path] = field(default_factory=list)
    """Every rank's mp4 files, in prompt order; each has a .png contact sheet beside it."""

    def lines(self) -> list[str]:
        folders = sorted({str(p.parent) for p in self.videos})
        return [f"fastcog sample: {len(self.videos)} video(s) with contact sheets (.png) in {', '.join(folders)}",
                *(f"  {p.name}" for p in self.videos)]


def read_prompts(opts: SampleOptions, source: Source) -> tuple[list[str], list[str]]:
    """(prompts, image paths as given): --prompt and --prompts-file, or the run's validation prompts."""
    prompts = list(opts.prompts)
    if opts.prompts_file is not None:
        path = Path(opts.prompts_file)
        if not path.is_file():
            raise DataError(f"--prompts-file {opts.prompts_file!r} does not exist: give a text file with one prompt "
                            "per line")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise DataError(f"--prompts-file {opts.prompts_file!r} holds no prompt: write one per line")
        prompts += lines
    images = list(opts.images)
    if not prompts and source.cfg is not None and source.cfg.validation.prompts:
        v, root = source.cfg.validation, Path(source.cfg.data.data_root)
        prompts = list(v.prompts)
        images = images or [str(p if Path(p).is_absolute() else root / p) for p in v.images]
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE (one prompt per line)")
    return prompts, images


def make_jobs(prompts: list[str], images: list[str], source: Source) -> list[Job]:
    """One job per prompt, each I2V prompt with its image (one image for all, or one each)."""
    name = source.variant.name
    if not source.variant.is_i2v:
        if images:
            raise ConfigError(f"--image is for image-to-video models, and {source.model} is {name} (text-to-video): "
                              "leave it out")
        return [Job(i, p) for i, p in enumerate(prompts)]
    if not images:
        raise ConfigError(f"{source.model} is {name}, an image-to-video model: give the first frame with "
                          "--image FILE (one for every prompt, or one per prompt)")
    if len(images) not in (1, len(prompts)):
        raise ConfigError(f"{len(images)} images for {len(prompts)} prompts: give one --image for every prompt, "
                          "or one per prompt")
    for image in images:
        if not Path(image).is_file():
            raise DataError(f"--image {image!r} does not exist: give the path of the image (PNG, JPEG, ...) the "
                            "video starts from")
    paths = [Path(image) for image in images] * (len(prompts) if len(images) == 1 else 1)
    return [Job(i, p, paths[i]) for i, p in enumerate(prompts)]


def video_size(opts: SampleOptions, source: Source) -> tuple[int, int, int]:
    """(frames, height, width): as asked, else the run's training size, else the model's sample size."""
    v = source.variant
    sample = (v.sample_frames, v.sample_height * VAE_SPATIAL_FACTOR, v.sample_width * VAE_SPATIAL_FACTOR)
    if source.cfg is not None:
        default = (source.cfg.data.num_frames, source.cfg.data.height, source.cfg.data.width)
    elif v.patch_size_t is not None and (opts.height is None or opts.width is None):
        # The 1.5 configs' sample size (300 latents: 2400 px) is not a size the model renders at.
        raise ConfigError(f"{source.model} is {v.name}, which has no default video size: give --height and --width "
                          "(multiples of 16, e.g. 768 and 1360)")
    else:
        default = sample
    size = tuple(default[i] if asked is None else asked for i, asked in enumerate((opts.frames, opts.height,
                                                                                   opts.width)))
    frames, height, width = size
    if frames < 1 or (frames - 1) % 8:
        raise ConfigError(f"--frames {frames} is not 8N+1 (the VAE compresses time 4x after the first frame): use "
                          f"{max(1, (frames - 1) // 8 * 8 + 1)} or {max(1, (frames - 1) // 8 * 8 + 1) + 8}")
    if min(height, width) <= 0 or height % PIXEL_MULTIPLE or width % PIXEL_MULTIPLE:
        raise ConfigError(f"--height {height} --width {width}: both must be positive multiples of {PIXEL_MULTIPLE}")
    if v.learned_positional_embeddings and (height, width) != sample[1:]:
        raise ConfigError(f"{v.name} has learned positional embeddings fixed at {sample[1]}x{sample[2]}: use "
                          f"--height {sample[1]} --width {sample[2]}")
    return frames, height, width


def check_options(opts: SampleOptions, source: Source) -> None:
    if opts.lora_scale is not None and not source.has_lora:
        raise ConfigError("--lora-scale sets a LoRA's strength, and no LoRA is loaded here: leave it out, or give "
                          "a LoRA run or --lora FILE")
    if opts.steps < 1:
        raise ConfigError(f"--steps {opts.steps}: must be at least 1")
    if opts.fps < 1:
        raise ConfigError(f"--fps {opts.fps}: must be at least 1")
    if opts.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("--cpu-offload moves each model between the CPU and the GPU as it runs, and there is no "
                          "GPU here: leave it out")


def output_folder(opts: SampleOptions, source: Source) -> Path:
    """--out, else <run>/samples (<run>/samples/checkpoint-<step> for a checkpoint), else ./samples."""
    if opts.out is not None:
        return Path(opts.out)
    if source.run_dir is None:
        return Path("samples")
    folder = source.run_dir / "samples"
    return folder / source.checkpoint.name if source.checkpoint is not None else folder


def write_contact_sheet(path: Path, frames: np.ndarray) -> Path:
    """A PNG of SHEET_FRAMES frames side by side (first to last), each at most SHEET_HEIGHT tall."""
    from PIL import Image

    picks = sorted(set(np.linspace(0, len(frames) - 1, SHEET_FRAMES).round().astype(int).tolist()))
    h, w = frames.shape[1:3]
    scale = min(1.0, SHEET_HEIGHT / h)
    th, tw, gap = max(1, round(h * scale)), max(1, round(w * scale)), 4
    sheet = Image.new("RGB", (len(picks) * (tw + gap) - gap, th), (16, 16, 16))
    for k, i in enumerate(picks):
        sheet.paste(Image.fromarray(frames[i]).resize((tw, th), Image.Resampling.LANCZOS), (k * (tw + gap), 0))
    tmp = path.with_name(f".{path.stem}.tmp.png")  # renamed into place: never a half-written sheet
    sheet.save(tmp)
    tmp.replace(path)
    return path


def sample(opts: SampleOptions) -> SampleResult:
    """Render every prompt (this rank's share under torchrun); returns all ranks' mp4 paths."""
    source = resolve_source(opts.run, opts.model, opts.lora, opts.dtype)
    prompts, images = read_prompts(opts, source)
    jobs = make_jobs(prompts, images, source)
    frames, height, width = video_size(opts, source)
    check_options(opts, source)
    out = output_folder(opts, source)
    world = init_distributed()
    mine = jobs[world.rank::world.world_size]
    settings = RenderSettings(num_frames=frames, height=height, width=width, num_inference_steps=opts.steps,
                              guidance_scale=opts.guidance_scale,
                              max_sequence_length=source.variant.max_text_seq_length)
    written = _render_jobs(opts, source, mine, settings, out, world) if mine else []
    gathered = all_gather_objects(written)
    return SampleResult(sorted((p for paths in gathered for p in paths), key=lambda p: p.name))


def _render_jobs(opts: SampleOptions, source: Source, jobs: list[Job], settings: RenderSettings, out: Path,
                 world: World) -> list[Path]:
    from fastcog.models import COMPONENTS, TORCH_DTYPES, load_components, set_vae_memory_options

    dtype = TORCH_DTYPES[source.dtype]
    parts = tuple(p for p in COMPONENTS if p != "transformer" or source.transformer is None)
    comps = load_components(source.model, source.dtype, parts)
    transformer = load_transformer(source, dtype, comps.transformer)
    pipe = make_pipeline(comps, transformer, source.cfg.model.i2v_image_scale if source.cfg else "pipeline")
    if source.has_lora:
        load_lora(source, transformer, type(pipe), 1.0 if opts.lora_scale is None else opts.lora_scale)
    set_vae_memory_options(comps.vae, slicing=opts.vae_slicing, tiling=opts.vae_tiling)
    device = device_for(world)
    if opts.cpu_offload:
        pipe.enable_model_cpu_offload(gpu_id=world.local_rank)
    else:
        pipe.to(device)
    out.mkdir(parents=True, exist_ok=True)
    scale = "" if opts.lora_scale is None else f"-lora{opts.lora_scale:g}"
    bar = tqdm(total=len(jobs) * settings.num_inference_steps, unit="step", dynamic_ncols=True,
               desc="sampling" if not world.distributed else f"sampling (rank 0 of {world.world_size})",
               disable=None if opts.progress and world.is_main else True)  # None: quiet when not a terminal
    written = []
    with bar:
        for job in jobs:
            image = conditioning_image(job.image, settings.height, settings.width) if job.image else None
            frames = render(pipe, job.prompt, settings, opts.seed + job.index, dtype, image, on_step=bar.update)
            stem = f"{job.index:03d}-{slug(job.prompt)}-seed{opts.seed + job.index}{scale}"
            written.append(write_video(out / f"{stem}.mp4", frames, fps=opts.fps))
            write_contact_sheet(out / f"{stem}.png", frames)
    return written
