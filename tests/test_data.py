"""Bad data is converted where sensible, otherwise skipped and counted; too much of it stops the run."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from iomm.data.images import BadSample, DataReport, list_images, load_image
from iomm.data.pairs import read_pairs
from iomm.training.trainer import Trainer, TrainingStopped


def _rgb(size=(40, 30), color=(200, 10, 10)):
    return Image.new("RGB", size, color)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_unusual_modes_are_converted(tmp_path, mode):
    image = _rgb().convert(mode) if mode != "I;16" else Image.fromarray(np.full((30, 40), 40000, np.uint16))
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    image.save(path)
    tensor = load_image(path, 16)
    assert tensor.shape == (3, 16, 16) and 0.0 <= tensor.min() and tensor.max() <= 1.0


def test_alpha_is_composited_over_white(tmp_path):
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png", 8).min() == 1.0


@pytest.mark.parametrize("content, reason", [
    (b"not an image at all", "unreadable"),
    (b"", "unreadable"),
])
def test_non_images_raise_bad_sample(tmp_path, content, reason):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(BadSample, match=reason):
        load_image(tmp_path / "bad.png", 16)


def test_truncated_and_tiny_images(tmp_path):
    _rgb((64, 64)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSample, match="unreadable"):
        load_image(tmp_path / "cut.jpg", 16)
    _rgb((4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(BadSample, match="smaller"):
        load_image(tmp_path / "tiny.png", 16)
    with pytest.raises(BadSample, match="missing"):
        load_image(tmp_path / "nope.png", 16)


def test_resize_shorter_side_and_center_crop(tmp_path):
    array = np.zeros((20, 60, 3), np.uint8)
    array[:, 20:40] = 255  # a white band in the middle third
    Image.fromarray(array).save(tmp_path / "wide.png")
    tensor = load_image(tmp_path / "wide.png", 20)
    assert tensor.shape == (3, 20, 20) and tensor.mean() > 0.95


def test_jsonl_pairs_skip_and_count_bad_lines(tmp_path):
    _rgb().save(tmp_path / "a.png")
    lines = [
        json.dumps({"image": "a.png", "caption": "a red square"}),
        json.dumps({"image": "a.png", "caption": "a red square"}),  # duplicate
        json.dumps({"image": "missing.png", "caption": "x"}),
        json.dumps({"image": "a.png", "caption": "  "}),
        json.dumps({"caption": "no image"}),
        "{not json",
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"image": "a.png", "caption": "\xff\xfe"}\n')
    report = DataReport()
    pairs = read_pairs(path, report)
    assert [p.caption for p in pairs] == ["a red square"] and pairs[0].image == tmp_path / "a.png"
    assert sum(report.skipped.values()) == 6 and report.seen == 7
    assert {"duplicate line", "image path does not exist", "empty or missing caption", "line is not JSON",
            "line has no 'image' string", "caption file line is not UTF-8"} == set(report.skipped)
    assert "pairs.jsonl:2" in report.examples["duplicate line"]


def _folder(tmp_path, good, bad):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "sub" / f"{i}.png")
    for i in range(bad):
        (folder / f"bad{i}.jpg").write_bytes(b"garbage")
    return folder


def test_training_skips_and_reports_bad_files(tiny_config, tmp_path, capsys):
    folder = _folder(tmp_path, good=30, bad=1)
    assert len(list_images(folder)) == 31
    trainer = Trainer(tiny_config("data.source=folder", f"data.path={folder}", "train.steps=3",
                                  "data.max_bad_fraction=0.5"), tmp_path / "run", progress=False)
    trainer.fit()
    state = json.loads((tmp_path / "run/checkpoints/step_00000003/state.json").read_text())
    assert state["data"]["seen"] >= 12
    assert "data:" in capsys.readouterr().out


def test_mostly_bad_data_stops_the_run_with_a_report(tiny_config, tmp_path):
    folder = _folder(tmp_path, good=2, bad=20)
    trainer = Trainer(tiny_config("data.source=folder", f"data.path={folder}", "train.steps=40"),
                      tmp_path / "run", progress=False)
    with pytest.raises(TrainingStopped, match="unreadable image"):
        trainer.fit()
    assert (tmp_path / "run/checkpoints").is_dir()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.sampled_from([".png", ".jpg", ".webp"]))
def test_arbitrary_bytes_load_or_raise_bad_sample(tmp_path, data, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(data)
    try:
        tensor = load_image(path, 8)
        assert tensor.shape == (3, 8, 8)
    except BadSample:
        pass
