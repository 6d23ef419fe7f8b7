"""Reference list-file datasets: a caption file, a video list and optionally an image list.

All three are plain text files under `data_root`, one entry per line, matched by line
number. Everything is validated up front (counts, every media file present) so a bad
dataset fails in seconds with one message listing every problem, not hours into caching.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fastcog.errors import DataError

__all__ = ["Sample", "read_list_dataset"]

# How many missing files are named in the error; the rest are counted.
_MAX_LISTED = 5


@dataclass(frozen=True)
class Sample:
    """One training example: its caption, its clip and, for I2V, its conditioning image."""

    caption: str
    video: Path
    image: Path | None = None


def _read_lines(data_root: Path, name: str, what: str, option: str) -> tuple[Path, list[str]]:
    """Stripped non-blank lines of a list file under data_root (blank lines are dropped)."""
    path = data_root / name
    if not path.is_file():
        reason = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"{what} {path} {reason}; set {option} to a file relative to data_root {data_root}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not valid UTF-8 ({exc}); re-save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{what} {path} could not be read ({exc}); check its permissions") from exc
    return path, [line.strip() for line in text.splitlines() if line.strip()]


def _check_count(a_path: Path, a: list[str], b_path: Path, b: list[str]) -> None:
    if len(a) != len(b):
        raise DataError(
            f"{a_path} has {len(a)} non-blank lines but {b_path} has {len(b)}; "
            "they are matched line by line, so make the counts equal"
        )


def read_list_dataset(
    data_root: str | os.PathLike,
    caption_column: str,
    video_column: str,
    image_column: str | None = None,
) -> list[Sample]:
    """Read and validate a reference list dataset.

    `caption_column`, `video_column` and `image_column` are file names relative to
    `data_root` (the reference's naming). Media paths in the lists are relative to
    `data_root` (absolute paths are used as is). Raises `DataError` if data_root or a list
    file is missing, the caption list is empty, the counts differ, or any media file is
    missing (all of them are reported, not just the first).
    """
    root = Path(data_root)
    if not root.is_dir():
        reason = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data_root {root} {reason}; set data_root to the folder holding the list files")

    caption_path, captions = _read_lines(root, caption_column, "caption file", "caption_column")
    video_path, videos = _read_lines(root, video_column, "video list", "video_column")
    images: list[str] | None = None
    if image_column is not None:
        image_path, images = _read_lines(root, image_column, "image list", "image_column")

    if not captions:
        raise DataError(f"caption file {caption_path} has no non-blank lines; add one prompt per line")
    _check_count(caption_path, captions, video_path, videos)
    if images is not None:
        _check_count(image_path, images, video_path, videos)

    samples = [
        Sample(
            caption=caption,
            video=root / video,
            image=root / images[i] if images is not None else None,
        )
        for i, (caption, video) in enumerate(zip(captions, videos, strict=True))
    ]

    missing: list[Path] = []
    for sample in samples:
        for media in (sample.video, sample.image):
            if media is not None and not media.is_file():
                missing.append(media)
    if missing:
        shown = ", ".join(str(p) for p in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{len(missing)} media file(s) listed in {video_path.name}"
            f"{' / ' + image_path.name if images is not None else ''} are missing: {shown}{more}; "
            "fix the paths (relative to data_root) or remove those lines from every list file"
        )
    return samples
