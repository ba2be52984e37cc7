"""Bad data is converted where sensible, otherwise skipped and counted; too much of it stops the run."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from iomm.data.images import BadSample, DataReport, list_images, load_image, resize_center_crop
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


@pytest.mark.parametrize("array, expected", [
    (np.full((30, 40), 200, np.uint16), 200 / 65535),  # a dark 16-bit image stays dark
    (np.full((30, 40), 40000, np.uint16), 40000 / 65535),
    (np.full((30, 40), 0.5, np.float32), 0.5),  # float in [0, 1]
    (np.full((30, 40), np.nan, np.float32), 0.0),
])
def test_high_bit_depth_keeps_its_range(tmp_path, array, expected):
    Image.fromarray(array).save(tmp_path / "x.tiff")
    assert load_image(tmp_path / "x.tiff", 8).mean().item() == pytest.approx(expected, abs=1 / 255)


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
    assert torch.equal(tensor, torch.ones(3, 20, 20))  # exactly the middle third: a crop 1 px off takes black


def test_long_thin_image_resamples_only_its_square(monkeypatch):
    image = Image.new("RGB", (100_000, 8))  # resizing the whole image to 256 px high would need 9.6 GB
    image.paste((255, 255, 255), (49_996, 0, 50_004, 8))  # the centre square is white
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a, **k))
    out = resize_center_crop(image, 256)
    assert out.size == (256, 256) and sizes == [(256, 256)]
    assert np.asarray(out)[:, 64:192].min() == 255 and np.asarray(out).mean() > 240


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


@pytest.mark.parametrize("line, reason", [
    ('{"image": "a.png", "caption": "\\ud800 lone surrogate"}', "caption file line is not UTF-8"),
    ('{"image": "' + "x" * 5000 + '", "caption": "too long a name"}', "image path does not exist"),
    ('{"image": "a\\u0000.png", "caption": "NUL in the name"}', "image path does not exist"),
    ("[" * 100_000, "line is not JSON"),
])
def test_jsonl_lines_that_used_to_crash_are_skipped(tmp_path, line, reason):
    _rgb().save(tmp_path / "a.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    report = DataReport()
    assert read_pairs(path, report) == [] and dict(report.skipped) == {reason: 1}


def test_jsonl_byte_order_mark_and_crlf_are_accepted(tmp_path):
    _rgb().save(tmp_path / "a.png")
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"image": "a.png", "caption": "one"}\r\n{"image": "a.png", "caption": "two"}\r\n')
    report = DataReport()
    assert [p.caption for p in read_pairs(path, report)] == ["one", "two"] and not report.skipped


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
_texts = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12)  # Cs: lone surrogates
_lines = st.one_of(
    st.binary(max_size=40),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({
        "image": st.sampled_from(["a.png", "b.png", "missing.png", "", "."]) | _texts | st.text(min_size=256)
        | _json_values,
        "caption": st.sampled_from(["a red square", "  "]) | _texts | _json_values,
    }).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_lines, max_size=8))
def test_any_jsonl_reads_cleanly_and_accounts_for_every_line(tmp_path, lines):
    _rgb().save(tmp_path / "a.png")
    _rgb(color=(0, 0, 255)).save(tmp_path / "b.png")
    data = b"\n".join(lines)
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(data)
    report = DataReport()
    pairs = read_pairs(path, report)
    assert report.seen == sum(1 for raw in data.splitlines() if raw.strip())
    assert report.seen - sum(report.skipped.values()) == len(pairs) == len(set(pairs))
    for pair in pairs:
        assert pair.image.is_file() and pair.caption.strip() == pair.caption != ""
        pair.caption.encode("utf-8")


def test_bad_fraction_must_clearly_exceed_the_limit():
    def report(bad, good):
        r = DataReport()
        for _ in range(good):
            r.ok()
        for _ in range(bad):
            r.bad("x", "unreadable image")
        return r

    assert not report(1, 69).exceeds(0.01)  # 1.4 %, but one unlucky draw of a 0.5 % bad folder is that likely
    assert not report(0, 1000).exceeds(0.0)
    assert report(1, 1000).exceeds(0.0)
    assert report(30, 970).exceeds(0.01) and not report(12, 988).exceeds(0.01)
    assert report(58, 6).exceeds(0.01) and not report(64, 0).exceeds(1.0)


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
    folder = _folder(tmp_path, good=6, bad=2)
    assert len(list_images(folder)) == 8
    trainer = Trainer(tiny_config("data.source=folder", f"data.path={folder}", "train.steps=3",
                                  "data.max_bad_fraction=0.9"), tmp_path / "run", progress=False)
    trainer.fit()
    data = json.loads((tmp_path / "run/checkpoints/step_00000003/state.json").read_text())["data"]
    skipped = data["skipped"]["unreadable image (UnidentifiedImageError)"]
    assert skipped >= 1 and data["seen"] == 12 + skipped
    assert f"{skipped} x unreadable image" in capsys.readouterr().out


def test_mostly_bad_jsonl_stops_the_run_with_a_report(tiny_config, tmp_path):
    _rgb().save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": f"caption {i}"}) for i in range(10)] + ["{broken"] * 90
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    trainer = Trainer(tiny_config(f"data.pairs={tmp_path / 'pairs.jsonl'}", "train.mix_ratio=0.5", "train.steps=5"),
                      tmp_path / "run", progress=False)
    with pytest.raises(TrainingStopped, match=r"(?s)data.max_bad_fraction.*90 x line is not JSON"):
        trainer.fit()
    assert trainer.step <= 1


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


_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tiff", "GIF": ".gif", "BMP": ".bmp"}


def _image_in_mode(mode, w, h, rng):
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((h, w)).astype(np.float32))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F"]),
       st.sampled_from(sorted(_FORMATS)), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1),
       st.one_of(st.none(), st.floats(0, 1).map(lambda f: ("cut", f)), st.tuples(st.just("flip"), st.floats(0, 1))))
def test_generated_images_convert_or_fail_as_bad_samples(tmp_path, mode, fmt, w, h, seed, damage):
    path = tmp_path / f"x{_FORMATS[fmt]}"
    try:
        _image_in_mode(mode, w, h, np.random.default_rng(seed)).save(path, format=fmt)
    except (OSError, ValueError, KeyError):
        reject()  # this format cannot store this mode
    data = bytearray(path.read_bytes())
    if damage is not None:
        at = int(damage[1] * (len(data) - 1))
        data = data[:at] if damage[0] == "cut" else data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
        path.write_bytes(bytes(data))
    try:
        tensor = load_image(path, 8)
    except BadSample as err:
        assert damage is not None or min(w, h) < 8, err  # an intact image of any mode is converted
        return
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all() and 0.0 <= tensor.min() and tensor.max() <= 1.0
