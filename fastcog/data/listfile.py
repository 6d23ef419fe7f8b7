"""Dataset formats: reference list files, or one CSV / JSONL metadata file.

- List files (the reference layout): a caption file, a video list and optionally an image
  list, plain text under `data_root`, one entry per line, matched by line number; blank
  lines are dropped (as the reference does). When that leaves the files with different
  counts, the error names the first line that is blank in one file and not in the other
  (typically a caption left empty), so the fix is one edit.
- A metadata file: CSV with a header row, or JSONL with one JSON object per line, holding a
  caption, a video path and optionally an image path per row. Unlike list files, a row
  cannot silently shift against another file, so a blank caption is an error naming its
  line instead of being dropped.

Media paths are relative to `data_root` (absolute paths are used as is). Everything is
validated up front (counts, columns, every media file present) so a bad dataset fails in
seconds with one message listing every problem, not hours into caching.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastcog.errors import DataError

__all__ = ["METADATA_EXTENSIONS", "Sample", "read_dataset", "read_list_dataset", "read_metadata_dataset"]

# Metadata file extensions and the format each one selects.
METADATA_EXTENSIONS: dict[str, str] = {".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl"}

# How many missing files are named in the error; the rest are counted.
_MAX_LISTED = 5


@dataclass(frozen=True)
class Sample:
    """One training example: its caption, its clip and, for I2V, its conditioning image."""

    caption: str
    video: Path
    image: Path | None = None


def _read_lines(data_root: Path, name: str, what: str, option: str) -> tuple[Path, list[str]]:
    """Stripped lines of a list file under data_root, blank ones included (as "")."""
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
    return path, [line.strip() for line in text.splitlines()]


def _non_blank(lines: list[str]) -> list[str]:
    return [line for line in lines if line]


def _check_count(a_path: Path, a: list[str], b_path: Path, b: list[str]) -> None:
    """Equal non-blank counts, else one error naming the first line blank in one file only."""
    if len(_non_blank(a)) == len(_non_blank(b)):
        return
    for number, (x, y) in enumerate(zip(a, b), start=1):
        if bool(x) != bool(y):
            blank, full, entry = (a_path, b_path, y) if not x else (b_path, a_path, x)
            entry = entry if len(entry) <= 60 else entry[:57] + "..."
            raise DataError(
                f"{blank} line {number} is blank but {full.name} line {number} is {entry!r}; the files are matched "
                f"line by line: write the missing entry on line {number} of {blank.name}, or delete line {number} "
                f"of {full.name} to leave that sample out"
            )
    raise DataError(
        f"{a_path} has {len(_non_blank(a))} non-blank lines but {b_path} has {len(_non_blank(b))}; "
        "they are matched line by line, so make the counts equal"
    )


def _check_root(root: Path) -> None:
    if not root.is_dir():
        reason = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data_root {root} {reason}; set data_root to the folder holding the dataset files")


def _missing_media(pairs: list[tuple[str, Path]]) -> tuple[int, str]:
    """(count, "a, b, c and N more") of the media files in `pairs` that are missing.

    Each pair is (label, path); the label prefixes the path in the message (e.g. the line
    of a metadata file), empty for list files.
    """
    missing = [f"{label}{path}" for label, path in pairs if not path.is_file()]
    shown = ", ".join(missing[:_MAX_LISTED])
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return len(missing), shown + more


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
    _check_root(root)

    caption_path, captions = _read_lines(root, caption_column, "caption file", "caption_column")
    video_path, videos = _read_lines(root, video_column, "video list", "video_column")
    images: list[str] | None = None
    if image_column is not None:
        image_path, images = _read_lines(root, image_column, "image list", "image_column")

    if not _non_blank(captions):
        raise DataError(f"caption file {caption_path} has no non-blank lines; add one prompt per line")
    _check_count(caption_path, captions, video_path, videos)
    if images is not None:
        _check_count(image_path, images, video_path, videos)
        images = _non_blank(images)
    captions, videos = _non_blank(captions), _non_blank(videos)

    samples = [
        Sample(
            caption=caption,
            video=root / video,
            image=root / images[i] if images is not None else None,
        )
        for i, (caption, video) in enumerate(zip(captions, videos, strict=True))
    ]

    count, shown = _missing_media(
        [("", media) for sample in samples for media in (sample.video, sample.image) if media is not None]
    )
    if count:
        raise DataError(
            f"{count} media file(s) listed in {video_path.name}"
            f"{' / ' + image_path.name if images is not None else ''} are missing: {shown}; "
            "fix the paths (relative to data_root) or remove those lines from every list file"
        )
    return samples


# --- CSV / JSONL metadata -------------------------------------------------------------------

# One parsed row: (line number of its first physical line, {column: value}).
_Row = tuple[int, dict[str, object]]


def _csv_rows(path: Path, text: str) -> tuple[list[str], int, Iterator[_Row]]:
    """Header columns, the header's line, and the data rows each with the line it starts on.

    csv.reader handles quoting (commas and newlines inside quoted captions); it reads from a
    StringIO with newline="" as the csv module requires (the text's line ends are already
    normalised to \n by read_text).
    A row with more fields than the header is an error rather than being truncated: it is
    almost always a caption with an unquoted comma, and taking the first fields would pair
    the wrong text with the wrong clip. Missing trailing fields read as empty.
    """
    # skipinitialspace: hand-written `caption, video` and `a, "b, c"` parse as meant.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, skipinitialspace=True)
    header: list[str] | None = None
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                header = [cell.strip() for cell in row]
                break
    except csv.Error as exc:
        raise DataError(f"metadata file {path} line {reader.line_num} is not valid CSV ({exc}); fix it") from exc
    if header is None:
        raise DataError(f"metadata file {path} is empty; it needs a header row (e.g. caption,video) and a row per clip")
    header_line = reader.line_num
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise DataError(
            f"metadata file {path} line {header_line}: column(s) {', '.join(duplicated)} appear more than once "
            "in the header; rename or remove the duplicates"
        )

    def rows() -> Iterator[_Row]:
        start = reader.line_num + 1
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    if len(row) > len(header):
                        raise DataError(
                            f"metadata file {path} line {start} has {len(row)} fields but the header has "
                            f"{len(header)} ({', '.join(header)}); put double quotes around values that "
                            'contain commas, e.g. "a red, square"'
                        )
                    yield start, dict(zip(header, row + [""] * (len(header) - len(row))))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"metadata file {path} line {start} is not valid CSV ({exc}); fix it") from exc

    return header, header_line, rows()


def _jsonl_rows(path: Path, text: str) -> Iterator[_Row]:
    """Each non-blank line as a JSON object, with its line number.

    Split on "\n" only: str.splitlines would also split on U+2028 and friends, which JSON
    allows unescaped inside strings.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"metadata file {path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from exc
        if not isinstance(value, dict):
            raise DataError(
                f"metadata file {path} line {number} is a JSON {type(value).__name__}, not an object; "
                'each line must be one JSON object like {"caption": "...", "video": "..."}'
            )
        yield number, value


def _field(path: Path, line: int, row: dict[str, object], key: str, what: str, nullable: bool = False) -> str | None:
    """Stripped string value of `key`; None when the key is absent (or null, if `nullable`)."""
    if key not in row:
        return None
    value = row[key]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"metadata file {path} line {line}: {what} {key!r} is {json.dumps(value)}, not a string; "
            "make it a string path or caption"
        )
    return value.strip()


def read_metadata_dataset(
    data_root: str | os.PathLike,
    metadata_file: str | os.PathLike,
    caption_key: str = "caption",
    video_key: str = "video",
    image_key: str | None = "image",
) -> list[Sample]:
    """Read and validate a CSV (header row) or JSONL (one object per line) dataset.

    The format is chosen by extension: ``.csv``, or ``.jsonl`` / ``.json-lines``.
    `metadata_file` is relative to `data_root` (or absolute), and so are the media paths in
    it. `caption_key` and `video_key` must be present in every row. The image column is
    optional: when the file has an `image_key` column/key, a row's non-empty value is its I2V
    conditioning image and an empty one means "use the clip's first frame"; without that
    column every sample has ``image=None``. Pass ``image_key=None`` to ignore images.

    Raises `DataError` (one line, naming the file and line) for: an unknown extension, a
    missing or unreadable file, a missing column/key (listing the available ones), a
    malformed JSON or CSV line, a blank caption or video path, a file with no rows, and
    missing media files (all counted, the first few named with their line).
    """
    root = Path(data_root)
    _check_root(root)
    path = root / metadata_file  # an absolute metadata_file replaces root
    fmt = METADATA_EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"metadata file {path} has an unsupported extension {path.suffix or '(none)'!r}; use "
            f"{' / '.join(METADATA_EXTENSIONS)} (CSV with a header row, or JSON Lines: one object per line)"
        )
    if not path.is_file():
        reason = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"metadata file {path} {reason}; set metadata_file to a file relative to data_root {root}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as exc:
        raise DataError(f"metadata file {path} is not valid UTF-8 ({exc}); re-save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"metadata file {path} could not be read ({exc}); check its permissions") from exc

    what = "column" if fmt == "csv" else "key"
    if fmt == "csv":
        header, header_line, rows = _csv_rows(path, text)
        for key in (caption_key, video_key):
            if key not in header:
                raise DataError(
                    f"metadata file {path} line {header_line} (the header) has no {key!r} column "
                    f"(columns: {', '.join(header)}); add that column or rename yours to {key!r}"
                )
    else:
        rows = _jsonl_rows(path, text)

    samples: list[Sample] = []
    media: list[tuple[str, Path]] = []
    for line, row in rows:
        values: dict[str, str] = {}
        for key in (caption_key, video_key):
            value = _field(path, line, row, key, what)
            if value is None:  # only JSONL gets here: CSV columns were checked on the header
                available = ", ".join(map(repr, row)) or "none"
                raise DataError(
                    f"metadata file {path} line {line} has no {key!r} key (keys: {available}); "
                    f"add {key!r} to every line"
                )
            if not value:
                kind = "caption" if key == caption_key else "video path"
                raise DataError(
                    f"metadata file {path} line {line} has an empty {kind} ({what} {key!r}); "
                    "fill it in or remove the line"
                )
            values[key] = value
        image = _field(path, line, row, image_key, what, nullable=True) if image_key is not None else None
        sample = Sample(
            caption=values[caption_key],
            video=root / values[video_key],
            image=root / image if image else None,
        )
        samples.append(sample)
        media.append((f"line {line}: ", sample.video))
        if sample.image is not None:
            media.append((f"line {line}: ", sample.image))

    if not samples:
        raise DataError(f"metadata file {path} has no rows; add one row per clip")
    count, shown = _missing_media(media)
    if count:
        raise DataError(
            f"{count} media file(s) listed in {path.name} are missing: {shown}; "
            "fix the paths (relative to data_root) or remove those rows"
        )
    return samples


def read_dataset(
    data_root: str | os.PathLike,
    *,
    metadata_file: str | os.PathLike | None = None,
    caption_column: str = "prompts.txt",
    video_column: str = "videos.txt",
    image_column: str | None = None,
) -> list[Sample]:
    """Read the dataset from `metadata_file` when given, else from the reference list files.

    With a metadata file, captions / videos / images come from its ``caption`` / ``video``
    / ``image`` columns and the list-file names are not used; `image_column` (a list file)
    cannot be combined with it, because silently ignoring it would train I2V on first frames
    when the user meant their images.
    """
    if metadata_file is None:
        return read_list_dataset(data_root, caption_column, video_column, image_column)
    if image_column is not None:
        raise DataError(
            f"image_column={image_column!r} (a list file) and metadata_file={str(metadata_file)!r} are both set; "
            "with a metadata file put image paths in its 'image' column and unset image_column"
        )
    return read_metadata_dataset(data_root, metadata_file)
