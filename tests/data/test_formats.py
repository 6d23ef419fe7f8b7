"""CSV / JSONL metadata datasets and the list-file / metadata dispatcher."""

import json
from pathlib import Path

import pytest

from fastcog.data.listfile import Sample, read_dataset, read_list_dataset, read_metadata_dataset
from fastcog.errors import DataError


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def _write(root: Path, name: str, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text, encoding="utf-8")
    return root


def _jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _one_line_error(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# --- parsing ------------------------------------------------------------------------------


def test_csv_with_quoted_commas_and_quotes(tmp_path: Path) -> None:
    _touch(tmp_path, "videos/a.mp4", "videos/b c.mp4", "images/a.png")
    _write(
        tmp_path,
        "meta.csv",
        "caption,video,image,extra\n"
        '"a red, slowly moving square",videos/a.mp4,images/a.png,ignored\n'
        '\n'
        '  "she said ""hi"", twice",  videos/b c.mp4 ,,\n',
    )
    samples = read_metadata_dataset(tmp_path, "meta.csv")
    assert samples == [
        Sample("a red, slowly moving square", tmp_path / "videos/a.mp4", tmp_path / "images/a.png"),
        Sample('she said "hi", twice', tmp_path / "videos/b c.mp4", None),  # empty image: first frame
    ]


def test_csv_multiline_caption_and_bom(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4", "b.mp4")
    # Spreadsheet exports: a UTF-8 BOM and CRLF line ends; a quoted caption spanning lines.
    text = '\ufeffvideo,caption\r\na.mp4,"first line\r\nsecond line"\r\nb.mp4,plain\r\n'
    (tmp_path / "m.csv").write_bytes(text.encode("utf-8"))
    samples = read_metadata_dataset(tmp_path, "m.csv")
    assert [s.caption for s in samples] == ["first line\nsecond line", "plain"]
    assert [s.video.name for s in samples] == ["a.mp4", "b.mp4"]


def test_jsonl(tmp_path: Path) -> None:
    _touch(tmp_path, "v/a.mp4", "v/b.mp4", "i/b.png")
    absolute = tmp_path / "v/a.mp4"
    _write(
        tmp_path,
        "meta.jsonl",
        _jsonl({"caption": "a, b \u2028 c", "video": str(absolute), "fps": 8})
        + "\n   \n"
        + _jsonl({"caption": " b ", "video": "v/b.mp4", "image": "i/b.png"}),
    )
    samples = read_metadata_dataset(tmp_path, "meta.jsonl")
    assert samples == [
        Sample("a, b \u2028 c", absolute, None),  # absolute path kept; U+2028 is not a line break
        Sample("b", tmp_path / "v/b.mp4", tmp_path / "i/b.png"),
    ]


def test_custom_keys_and_json_lines_extension(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4", "a.png")
    _write(tmp_path, "m.json-lines", _jsonl({"text": "t", "path": "a.mp4", "image": "a.png"}))
    samples = read_metadata_dataset(tmp_path, "m.json-lines", caption_key="text", video_key="path", image_key=None)
    assert samples == [Sample("t", tmp_path / "a.mp4", None)]


def test_null_image_means_first_frame(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4")
    _write(tmp_path, "m.jsonl", _jsonl({"caption": "c", "video": "a.mp4", "image": None}))
    assert read_metadata_dataset(tmp_path, "m.jsonl")[0].image is None


def test_absolute_metadata_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _touch(root, "a.mp4")
    meta = _write(tmp_path / "elsewhere", "m.csv", "caption,video\nc,a.mp4\n") / "m.csv"
    assert read_metadata_dataset(root, meta) == [Sample("c", root / "a.mp4")]


def test_csv_and_jsonl_agree(tmp_path: Path) -> None:
    names = [f"videos/{i}.mp4" for i in range(3)]
    _touch(tmp_path, *names)
    captions = ["one, two", 'say "x"', "plain"]
    csv_text = "caption,video\n" + "".join(
        '"' + c.replace('"', '""') + f'",{v}\n' for c, v in zip(captions, names)
    )
    _write(tmp_path, "m.csv", csv_text)
    _write(tmp_path, "m.jsonl", _jsonl(*({"caption": c, "video": v} for c, v in zip(captions, names))))
    assert read_metadata_dataset(tmp_path, "m.csv") == read_metadata_dataset(tmp_path, "m.jsonl")


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["meta.json", "meta.txt", "meta.tsv", "meta"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    _write(tmp_path, name, "caption,video\n")
    expected = rf"{name} has an unsupported extension.*\.csv / \.jsonl / \.json-lines"
    with pytest.raises(DataError, match=expected) as info:
        read_metadata_dataset(tmp_path, name)
    _one_line_error(info)


def test_missing_metadata_file_and_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="metadata file .*nope.csv does not exist; set metadata_file"):
        read_metadata_dataset(tmp_path, "nope.csv")
    with pytest.raises(DataError, match="data_root .*missing_root does not exist"):
        read_metadata_dataset(tmp_path / "missing_root", "m.csv")


def test_csv_missing_column_names_line_and_columns(tmp_path: Path) -> None:
    _write(tmp_path, "m.csv", "\ntext,video,image\nhello,a.mp4,\n")
    with pytest.raises(DataError) as info:
        read_metadata_dataset(tmp_path, "m.csv")
    message = _one_line_error(info)
    assert "m.csv line 2 (the header) has no 'caption' column" in message
    assert "columns: text, video, image" in message


def test_jsonl_missing_key_names_line_and_keys(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4")
    _write(
        tmp_path,
        "m.jsonl",
        _jsonl({"caption": "ok", "video": "a.mp4"}) + "\n" + _jsonl({"caption": "no video", "clip": "a.mp4"}),
    )
    with pytest.raises(DataError) as info:
        read_metadata_dataset(tmp_path, "m.jsonl")
    message = _one_line_error(info)
    assert "m.jsonl line 3 has no 'video' key (keys: 'caption', 'clip')" in message


def test_malformed_json_line(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4")
    _write(tmp_path, "m.jsonl", _jsonl({"caption": "ok", "video": "a.mp4"}) + '{"caption": "oops", "video": a.mp4}\n')
    with pytest.raises(DataError, match=r"m.jsonl line 2 is not valid JSON \(Expecting value at column 30\)") as info:
        read_metadata_dataset(tmp_path, "m.jsonl")
    _one_line_error(info)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_json_line_not_an_object(tmp_path: Path) -> None:
    _write(tmp_path, "m.jsonl", '["caption", "a.mp4"]\n')
    with pytest.raises(DataError, match="m.jsonl line 1 is a JSON list, not an object"):
        read_metadata_dataset(tmp_path, "m.jsonl")


def test_json_value_not_a_string(tmp_path: Path) -> None:
    _write(tmp_path, "m.jsonl", _jsonl({"caption": 42, "video": "a.mp4"}))
    with pytest.raises(DataError, match="m.jsonl line 1: key 'caption' is 42, not a string"):
        read_metadata_dataset(tmp_path, "m.jsonl")


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("m.csv", "caption,video\nok,a.mp4\n   ,a.mp4\n", 3),
        ("m.csv", 'caption,video\nok,a.mp4\n"",a.mp4\n', 3),
        ("m.csv", 'caption,video\n"two\nlines",a.mp4\n"  ",a.mp4\n', 4),  # counts physical lines
        ("m.jsonl", _jsonl({"caption": "ok", "video": "a.mp4"}, {"caption": " \t ", "video": "a.mp4"}), 2),
        ("m.jsonl", "\n\n" + _jsonl({"caption": "", "video": "a.mp4"}), 3),
    ],
)
def test_empty_caption_names_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    _touch(tmp_path, "a.mp4")
    _write(tmp_path, name, text)
    with pytest.raises(DataError, match=rf"{name} line {line} has an empty caption") as info:
        read_metadata_dataset(tmp_path, name)
    _one_line_error(info)


def test_empty_video_path_and_short_row(tmp_path: Path) -> None:
    _write(tmp_path, "m.csv", "caption,video\nonly a caption\n")
    with pytest.raises(DataError, match="m.csv line 2 has an empty video path"):
        read_metadata_dataset(tmp_path, "m.csv")


def test_unquoted_comma_is_an_error(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4")
    _write(tmp_path, "m.csv", "caption,video\na red, square,a.mp4\n")
    with pytest.raises(DataError, match="m.csv line 2 has 3 fields but the header has 2.*double quotes") as info:
        read_metadata_dataset(tmp_path, "m.csv")
    _one_line_error(info)


def test_bad_csv_quoting(tmp_path: Path) -> None:
    _write(tmp_path, "m.csv", 'caption,video\nok,a.mp4\n"bad" quote,a.mp4\n')
    with pytest.raises(DataError, match="m.csv line 3 is not valid CSV"):
        read_metadata_dataset(tmp_path, "m.csv")


@pytest.mark.parametrize(("name", "text"), [("m.csv", "caption,video\n\n"), ("m.jsonl", "\n \n")])
def test_no_rows(tmp_path: Path, name: str, text: str) -> None:
    _write(tmp_path, name, text)
    with pytest.raises(DataError, match=f"{name} has no rows"):
        read_metadata_dataset(tmp_path, name)


def test_empty_csv(tmp_path: Path) -> None:
    _write(tmp_path, "m.csv", "")
    with pytest.raises(DataError, match="m.csv is empty; it needs a header row"):
        read_metadata_dataset(tmp_path, "m.csv")


def test_duplicate_csv_column(tmp_path: Path) -> None:
    _write(tmp_path, "m.csv", "caption,video,caption\n")
    with pytest.raises(DataError, match="m.csv line 1: column.s. caption appear more than once"):
        read_metadata_dataset(tmp_path, "m.csv")


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_all_missing_media_listed(tmp_path: Path, name: str) -> None:
    videos = [f"videos/v{i}.mp4" for i in range(8)]
    _touch(tmp_path, videos[0], "images/i0.png")
    if name == "m.csv":
        text = "caption,video,image\n" + "".join(f"c{i},{v},images/i{i}.png\n" for i, v in enumerate(videos[:2]))
        text += "".join(f"c{i},{v},\n" for i, v in enumerate(videos[2:], start=2))
    else:
        text = _jsonl(*({"caption": f"c{i}", "video": v} | ({"image": f"images/i{i}.png"} if i < 2 else {})
                        for i, v in enumerate(videos)))
    _write(tmp_path, name, text)
    with pytest.raises(DataError) as info:
        read_metadata_dataset(tmp_path, name)
    message = _one_line_error(info)
    first_row = 2 if name == "m.csv" else 1
    assert message.startswith(f"8 media file(s) listed in {name} are missing: ")
    assert f"line {first_row + 1}: {tmp_path / 'videos/v1.mp4'}" in message  # each named with its line
    assert f"line {first_row + 1}: {tmp_path / 'images/i1.png'}" in message
    for i in (2, 3, 4):
        assert f"v{i}.mp4" in message
    assert "and 3 more" in message
    assert "v0.mp4" not in message and "i0.png" not in message


# --- dispatcher ---------------------------------------------------------------------------


def test_read_dataset_dispatch(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4", "b.mp4", "a.png", "b.png")
    _write(tmp_path, "prompts.txt", "from list a\nfrom list b\n")
    _write(tmp_path, "videos.txt", "a.mp4\nb.mp4\n")
    _write(tmp_path, "images.txt", "a.png\nb.png\n")
    _write(tmp_path, "m.jsonl", _jsonl({"caption": "from metadata", "video": "b.mp4", "image": "a.png"}))

    assert read_dataset(tmp_path) == read_list_dataset(tmp_path, "prompts.txt", "videos.txt")
    assert read_dataset(tmp_path, image_column="images.txt")[1] == Sample(
        "from list b", tmp_path / "b.mp4", tmp_path / "b.png"
    )
    assert read_dataset(str(tmp_path), metadata_file="m.jsonl", caption_column="ignored.txt") == [
        Sample("from metadata", tmp_path / "b.mp4", tmp_path / "a.png")
    ]
    with pytest.raises(DataError, match="image_column='images.txt' .* and metadata_file='m.jsonl' are both set"):
        read_dataset(tmp_path, metadata_file="m.jsonl", image_column="images.txt")
