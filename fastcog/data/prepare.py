"""`fastcog prepare`: decode, encode and cache every training sample, in parallel, resumably.

Plan -> encode -> report:
  plan     each sample gets a resolution bucket (probing the clip when there are several)
           and cache paths keyed on everything that changes the content (cache.py)
  encode   DataLoader workers decode clips and images; the main process runs the VAE and T5;
           under torchrun every rank encodes its own share (item i goes to rank i % world)
  report   a summary (encoded / reused / failed, items/s) naming the failed clips, the clips
           shorter than their bucket (their last frame repeated) and the still images listed
           as videos; `failures.jsonl` lists every clip that could not be decoded, with the
           reason, and `notes.jsonl` the padded and still ones (kept across reruns, so a
           reused item is still reported). A failed clip is left out of training; the run
           stops only when more than data.max_failed_fraction of them fail.

Every file lands by atomic rename, so a killed prepare leaves only whole items behind and a
re-run encodes just what is missing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastcog.config import Config
from fastcog.data.buckets import Bucket, assign_bucket
from fastcog.data.cache import (
    CachedItem,
    CacheSpec,
    Encoder,
    image_key,
    item_seed,
    model_fingerprint,
    prompt_key,
    save_atomic,
    video_key,
)
from fastcog.data.listfile import Sample
from fastcog.errors import DataError, FastcogError
from fastcog.parallel import SINGLE_PROCESS, World, all_gather_objects, barrier
from fastcog.progress import iter_progress


@dataclass(frozen=True)
class PlannedItem:
    index: int
    sample: Sample
    spec: CacheSpec
    paths: CachedItem
    seed: int  # VAE sample and frame window (cache.item_seed)

    def missing(self) -> list[Path]:
        return [p for p in (self.paths.latents, self.paths.prompt_embeds, self.paths.image)
                if p is not None and not p.is_file()]


# How many files a summary line names; the rest are counted.
_MAX_NAMED = 5


def named(paths: Sequence[str]) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more'."""
    more = f" and {len(paths) - _MAX_NAMED} more" if len(paths) > _MAX_NAMED else ""
    return ", ".join(paths[:_MAX_NAMED]) + more


@dataclass
class PrepareResult:
    items: list[CachedItem]
    """The cached items usable for training (failed samples left out), in sample order."""
    encoded: int = 0
    reused: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[dict] = field(default_factory=list)
    """Usable clips that do not fill their bucket: kind "padded" (fewer frames than the bucket,
    the last one repeated) or "still" (one frame: a still image stands for the whole clip)."""
    data_root: Path | None = None
    """Files under it are named relative to it in the summary."""

    def name_of(self, row: dict) -> str:
        """A report row's file, relative to data_root when under it."""
        path = Path(row["video"])
        if self.data_root is not None and path.is_relative_to(self.data_root):
            return str(path.relative_to(self.data_root))
        return str(path)

    def summary(self, cache_dir: Path) -> str:
        rate = self.encoded / self.seconds if self.seconds > 0 and self.encoded else 0.0
        lines = [f"prepare: {self.encoded} encoded, {self.reused} reused, {len(self.failures)} failed "
                 f"in {self.seconds:.1f} s ({rate:.2f} items/s encoded) -> {cache_dir}"]
        if self.failures:
            failed = named([self.name_of(f) for f in self.failures])
            lines.append(f"  failed, left out of training ({len(self.failures)}): {failed}; "
                         f"reasons in {cache_dir / 'failures.jsonl'}")
        padded = [n for n in self.notes if n["kind"] == "padded"]
        if padded:
            lines.append(f"  shorter than their bucket, last frame repeated ({len(padded)}): "
                         + named([f"{self.name_of(n)} ({n['frames']} of {n['wanted']} frames)" for n in padded]))
        stills = [n for n in self.notes if n["kind"] == "still"]
        if stills:
            lines.append(f"  a single frame (a still image) repeated for the whole clip ({len(stills)}): "
                         + named([self.name_of(n) for n in stills]))
        if self.notes:
            lines.append(f"  listed in {cache_dir / 'notes.jsonl'}; to leave them out, remove them from the dataset; "
                         "to train short clips without repeats, add a bucket with fewer frames")
        return "\n".join(lines)


def cache_dir_for(cfg: Config) -> Path:
    d = cfg.data
    return Path(d.cache_dir) if d.cache_dir else Path(d.data_root) / ".fastcog_cache"


def buckets_for(cfg: Config) -> list[Bucket]:
    d = cfg.data
    return [tuple(b) for b in d.buckets] if d.buckets else [(d.num_frames, d.height, d.width)]


def plan(cfg: Config, samples: Sequence[Sample], need_images: bool) -> tuple[list[PlannedItem], list[dict]]:
    """Bucket and key every sample. Clips that cannot even be probed are failures."""
    from fastcog.data.video import probe_video

    d = cfg.data
    buckets = buckets_for(cfg)
    fingerprint = model_fingerprint(Path(cfg.model.path))
    cache_dir = cache_dir_for(cfg)
    planned, failures = [], []
    for index, sample in enumerate(samples):
        bucket = 0
        if len(buckets) > 1:
            try:
                info = probe_video(sample.video)
            except DataError as err:
                failures.append({"index": index, "video": str(sample.video), "reason": str(err)})
                continue
            bucket = assign_bucket(info.num_frames, info.height, info.width, buckets)
        frames, height, width = buckets[bucket]
        spec = CacheSpec(fingerprint, cfg.model.dtype, frames, height, width, d.sampling, d.resize,
                         d.latent_mode, cfg.train.seed, d.vae_tiling)
        image = None
        if need_images:
            source = sample.image or sample.video
            image = cache_dir / "images" / f"{image_key(spec, source, sample.image is None)}.safetensors"
        paths = CachedItem(
            latents=cache_dir / "latents" / f"{video_key(spec, sample.video)}.safetensors",
            prompt_embeds=cache_dir / "prompts" / f"{prompt_key(spec, sample.caption)}.safetensors",
            image=image, bucket=bucket,
        )
        planned.append(PlannedItem(index, sample, spec, paths, item_seed(spec, sample.video, Path(d.data_root))))
    return planned, failures


class _DecodeJobs(torch.utils.data.Dataset):
    """Runs in DataLoader workers: decode what an item still lacks; failures are returned, not raised."""

    def __init__(self, items: Sequence[PlannedItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from fastcog.data.video import decode_clip, first_frame, load_image

        item = self.items[i]
        spec, sample, paths = item.spec, item.sample, item.paths
        out: dict = {"i": i}
        try:
            if not paths.latents.is_file():
                rng = torch.Generator().manual_seed(item.seed)
                clip = decode_clip(sample.video, spec.num_frames, spec.height, spec.width, spec.sampling,
                                   spec.resize, rng=rng)
                out["frames"], out["source_frames"] = clip.frames, clip.source_frames
            if paths.image is not None and not paths.image.is_file():
                if sample.image is not None:
                    out["image"] = load_image(sample.image, spec.height, spec.width, spec.resize)
                else:
                    out["image"] = first_frame(sample.video, spec.height, spec.width, spec.resize)
        except DataError as err:
            out = {"i": i, "error": str(err)}
        return out


def prepare(
    cfg: Config,
    samples: Sequence[Sample],
    need_images: bool,
    make_encoder: Callable[[], Encoder],
    world: World = SINGLE_PROCESS,
    show_progress: bool = True,
) -> PrepareResult:
    """Make sure every sample is cached (encoding what is missing) and report on it.

    `make_encoder` is only called when something needs encoding, so a fully cached dataset
    never loads the VAE or T5.
    """
    t0 = time.perf_counter()
    cache_dir = cache_dir_for(cfg)
    planned, failures = plan(cfg, samples, need_images)
    # A clip that failed before and has not changed since (same cache key) fails again without
    # another decode attempt; editing or replacing the file changes its key and retries it.
    known_bad = _previous_rows(cache_dir / "failures.jsonl")
    # Padded and still clips were noted when they were decoded; a reused item keeps its note.
    known_notes = _previous_rows(cache_dir / "notes.jsonl")
    notes = [{**known_notes[it.paths.latents.stem], "index": it.index} for it in planned
             if it.paths.latents.stem in known_notes and it.paths.latents.is_file()]
    for it in planned:
        if it.missing() and it.paths.latents.stem in known_bad:
            failures.append({**known_bad[it.paths.latents.stem], "index": it.index})
    retried = {f["index"] for f in failures}
    todo = [it for it in planned if it.index not in retried and it.missing()]
    mine = [it for k, it in enumerate(todo) if k % world.world_size == world.rank]
    encoded = 0
    if mine:
        if not cfg.data.prepare_missing:
            raise FastcogError(
                f"{len(todo)} of {len(planned)} samples are not cached in {cache_dir} and data.prepare_missing "
                "is false: run `fastcog prepare CONFIG` first (or set data.prepare_missing=true)"
            )
        encoder = make_encoder()
        loader = torch.utils.data.DataLoader(
            _DecodeJobs(mine), batch_size=None, shuffle=False, num_workers=cfg.data.prepare_workers,
            prefetch_factor=2 if cfg.data.prepare_workers else None,
        )
        jobs = iter_progress(loader, len(mine), f"prepare (rank {world.rank})" if world.distributed else "prepare",
                             "item", enabled=show_progress)
        for job in jobs:
            item = mine[job["i"]]
            if "error" in job:
                failures.append({"index": item.index, "video": str(item.sample.video), "reason": job["error"],
                                 "key": item.paths.latents.stem})
                continue
            paths, spec = item.paths, item.spec
            if "frames" in job:
                if job["source_frames"] < spec.num_frames:
                    notes.append({"index": item.index, "video": str(item.sample.video),
                                  "kind": "still" if job["source_frames"] == 1 else "padded",
                                  "frames": job["source_frames"], "wanted": spec.num_frames,
                                  "key": item.paths.latents.stem})
                latents = encoder.encode_video(job["frames"], spec.latent_mode, item.seed)
                save_atomic({"latents": latents}, paths.latents)
            if not paths.prompt_embeds.is_file():
                save_atomic({"prompt_embeds": encoder.encode_prompt(item.sample.caption)}, paths.prompt_embeds)
            if "image" in job:
                save_atomic({"image": job["image"]}, paths.image)
            encoded += 1
    # Probe failures and the notes of reused items are found by every rank alike; keep one of each.
    failures, notes = _gathered(failures), _gathered(notes)
    encoded = sum(all_gather_objects(encoded))  # type: ignore[arg-type]
    barrier()
    failed = {f["index"] for f in failures}
    items = [it.paths for it in planned if it.index not in failed]
    notes = [n for n in notes if n["index"] not in failed]
    result = PrepareResult(items=items, encoded=encoded, reused=len(items) - encoded, failures=failures,
                           seconds=time.perf_counter() - t0, notes=notes, data_root=Path(cfg.data.data_root))
    # A complete cache in a read-only place (a shared dataset) is read as it is: its reports
    # describe what it holds, and nothing was added to it.
    if world.is_main and (encoded or not cache_dir.is_dir() or os.access(cache_dir, os.W_OK)):
        _write_reports(cache_dir, planned, failed, failures, notes)
    barrier()
    total = len(samples)
    if total and len(failures) / total > cfg.data.max_failed_fraction:
        raise DataError(
            f"{len(failures)} of {total} clips could not be used (more than data.max_failed_fraction="
            f"{cfg.data.max_failed_fraction}): {named([result.name_of(f) for f in failures])}; first reason: "
            f"{failures[0]['reason']}; all listed in {cache_dir / 'failures.jsonl'}"
        )
    if not items:
        raise DataError(f"no usable samples: every clip failed (see {cache_dir / 'failures.jsonl'})")
    return result


def _gathered(rows: list[dict]) -> list[dict]:
    """Every rank's rows, one per sample index, in index order."""
    unique = {row["index"]: row for part in all_gather_objects(rows) for row in part}  # type: ignore[union-attr]
    return [unique[k] for k in sorted(unique)]


def _previous_rows(report: Path) -> dict[str, dict]:
    """The rows of a report written by an earlier prepare, by cache key."""
    if not report.is_file():
        return {}
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    return {row["key"]: row for row in rows if "key" in row}


def _write_reports(cache_dir: Path, planned: Sequence[PlannedItem], failed: set[int], failures: list[dict],
                   notes: list[dict]) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "items": [
            {"index": it.index, "video": str(it.sample.video), "caption": it.sample.caption,
             "image": None if it.sample.image is None else str(it.sample.image),
             "bucket": [it.spec.num_frames, it.spec.height, it.spec.width], "spec": it.spec.__dict__,
             "latents": it.paths.latents.name, "prompt_embeds": it.paths.prompt_embeds.name,
             "image_cache": None if it.paths.image is None else it.paths.image.name}
            for it in planned if it.index not in failed
        ],
    }
    for name, text in (("manifest.json", json.dumps(manifest, indent=1)),
                       ("failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures)),
                       ("notes.jsonl", "".join(json.dumps(n) + "\n" for n in notes))):
        tmp = cache_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, cache_dir / name)
