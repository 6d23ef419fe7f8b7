"""List-file datasets: parsing, and one clear error per kind of broken dataset."""

from pathlib import Path

import pytest

from fastcog.data.listfile import Sample, read_list_dataset
from fastcog.errors import DataError


def _dataset(root: Path, captions: str, videos: str, images: str | None = None, touch: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text(captions)
    (root / "videos.txt").write_text(videos)
    if images is not None:
        (root / "images.txt").write_text(images)
    if touch:
        for listing in [videos] + ([images] if images is not None else []):
            for line in listing.splitlines():
                if line.strip():
                    (root / line.strip()).parent.mkdir(parents=True, exist_ok=True)
                    (root / line.strip()).write_bytes(b"x")
    return root


def test_reads_samples_and_drops_blank_lines(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path / "d",
        "  a red square  \n\nblue circle\n   \n",
        "videos/a.mp4\n\n  videos/b.mp4\n",
        "images/a.png\nimages/b.png\n\n",
    )
    samples = read_list_dataset(root, "prompts.txt", "videos.txt", "images.txt")
    assert samples == [
        Sample("a red square", root / "videos/a.mp4", root / "images/a.png"),
        Sample("blue circle", root / "videos/b.mp4", root / "images/b.png"),
    ]
    without_images = read_list_dataset(str(root), "prompts.txt", "videos.txt")
    assert [s.image for s in without_images] == [None, None]


def test_missing_data_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data_root .*nowhere does not exist"):
        read_list_dataset(tmp_path / "nowhere", "prompts.txt", "videos.txt")


def test_missing_list_file(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "a\n", "videos/a.mp4\n")
    with pytest.raises(DataError, match="captions.txt does not exist; set caption_column"):
        read_list_dataset(root, "captions.txt", "videos.txt")
    with pytest.raises(DataError, match="image list .*imgs.txt does not exist; set image_column"):
        read_list_dataset(root, "prompts.txt", "videos.txt", "imgs.txt")


def test_empty_caption_list(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "\n  \n", "")
    with pytest.raises(DataError, match="prompts.txt has no non-blank lines"):
        read_list_dataset(root, "prompts.txt", "videos.txt")


def test_count_mismatch_names_both_files_and_counts(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "a\nb\nc\n", "videos/a.mp4\nvideos/b.mp4\n")
    with pytest.raises(DataError, match=r"prompts.txt has 3 non-blank lines but .*videos.txt has 2") as info:
        read_list_dataset(root, "prompts.txt", "videos.txt")
    assert "\n" not in str(info.value)

    root = _dataset(tmp_path / "e", "a\nb\n", "videos/a.mp4\nvideos/b.mp4\n", "images/a.png\n")
    with pytest.raises(DataError, match=r"images.txt has 1 non-blank lines but .*videos.txt has 2"):
        read_list_dataset(root, "prompts.txt", "videos.txt", "images.txt")


def test_all_missing_media_listed(tmp_path: Path) -> None:
    videos = "".join(f"videos/v{i}.mp4\n" for i in range(8))
    captions = "".join(f"caption {i}\n" for i in range(8))
    root = _dataset(tmp_path / "d", captions, videos, touch=False)
    (root / "videos").mkdir()
    (root / "videos/v0.mp4").write_bytes(b"x")
    with pytest.raises(DataError) as info:
        read_list_dataset(root, "prompts.txt", "videos.txt")
    message = str(info.value)
    assert message.startswith("7 media file(s)")
    for i in range(1, 6):
        assert f"v{i}.mp4" in message
    assert "and 2 more" in message
    assert "v0.mp4" not in message
    assert "\n" not in message


def test_missing_images_reported_with_videos(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "a\nb\n", "videos/a.mp4\nvideos/b.mp4\n", touch=True)
    (root / "images.txt").write_text("images/a.png\nimages/b.png\n")
    (root / "videos/b.mp4").unlink()
    with pytest.raises(DataError, match=r"3 media file\(s\).*a.png.*b.mp4.*b.png"):
        read_list_dataset(root, "prompts.txt", "videos.txt", "images.txt")
