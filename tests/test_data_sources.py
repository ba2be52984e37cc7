"""Data at scale: WebDataset shards and Hugging Face datasets as sources, exact epochs across ranks and
workers, the data position in checkpoints, and `iomm data shards`."""

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from iomm.cli import main
from iomm.config import ConfigError
from iomm.data.epochs import EpochOrder
from iomm.data.images import BadSource, load_image
from iomm.data.mixed_batches import DataPosition, MixedBatches, batch_loader, build_sources
from iomm.training.trainer import Trainer

N_IMAGES = 12


def _images(tmp_path, n=N_IMAGES):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"caption {i}")
    return folder


def _fingerprint(image: torch.Tensor) -> int:
    return int((image * 255).round().sum())  # an exact integer: the same in any batch


def test_each_epoch_visits_every_item_once():
    n = 10
    order = EpochOrder(n, seed=5)
    for epoch in range(3):
        assert sorted(order.item(epoch * n + k) for k in range(n)) == list(range(n))
    assert [order.item(k) for k in range(n)] != [order.item(n + k) for k in range(n)]  # reshuffled
    assert [EpochOrder(n, seed=5).item(k) for k in range(n)] == [EpochOrder(n, seed=5).item(k) for k in range(n)]
    assert [EpochOrder(n, seed=5, stream=1).item(k) for k in range(n)] != [order.item(k) for k in range(n)]


def test_two_ranks_read_the_global_batch_of_one_rank_and_every_training_image_once(tiny_config, tmp_path):
    folder = _images(tmp_path)
    cfg = tiny_config("data.source=folder", f"data.path={folder}", "data.holdout=2")
    sources = build_sources(cfg)
    reference = {_fingerprint(load_image(f, 32)) for f in sorted(folder.glob("*.png"))}
    alone = MixedBatches(sources.images, None, 10, 1.0, seed=0)[0]  # one rank, the global batch: one epoch
    ranks = [MixedBatches(sources.images, None, 5, 1.0, seed=0, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat([b.images for b in ranks]), alone.images)
    seen = [_fingerprint(image) for image in alone.images]
    held = {_fingerprint(image) for image in sources.held_out}
    assert len(seen) == len(set(seen)) == N_IMAGES - 2
    assert set(seen) | held == reference and not set(seen) & held


def test_procedural_sources_give_the_same_global_batch_at_any_world_size(tiny_config):
    sources = build_sources(tiny_config("data.pairs=world:16", "train.mix_ratio=0.5"))
    alone = MixedBatches(sources.images, sources.pairs, 8, 0.5, seed=3)[4]
    ranks = [MixedBatches(sources.images, sources.pairs, 4, 0.5, seed=3, rank=r, world=2)[4] for r in range(2)]
    assert torch.equal(torch.cat([b.images for b in ranks]), alone.images)
    assert ranks[0].captions + ranks[1].captions == alone.captions
    assert MixedBatches(sources.images, sources.pairs, 4, 0.5, seed=3, world=2).position(4) == \
        MixedBatches(sources.images, sources.pairs, 8, 0.5, seed=3).position(4)


def test_resuming_at_a_saved_position_reads_what_the_whole_run_reads(tiny_config, tmp_path):
    folder = _images(tmp_path)
    cfg = tiny_config("data.source=folder", f"data.path={folder}", "train.mix_ratio=0.5",
                      f"data.pairs=jsonl:{_pairs_jsonl(folder)}")
    sources = build_sources(cfg)
    whole = MixedBatches(sources.images, sources.pairs, 4, 0.5, seed=1)
    expected = [whole[i] for i in range(6)]
    saved = whole.position(3)
    assert saved.images + saved.pairs == 12 and saved.micro_batch == 3
    resumed = MixedBatches(sources.images, sources.pairs, 4, 0.5, seed=1, start=saved)
    for i in range(3, 6):
        assert torch.equal(resumed[i].images, expected[i].images) and resumed[i].captions == expected[i].captions
    loaded = list(batch_loader(MixedBatches(sources.images, sources.pairs, 4, 0.5, seed=1), 0, 6, num_workers=2))
    assert all(torch.equal(a.images, b.images) for a, b in zip(loaded, expected))  # workers read the same
    with pytest.raises(IndexError, match="comes before this run's data position"):
        resumed[2]


def test_the_checkpoint_holds_the_data_position_and_a_resume_continues_from_it(tiny_config, tmp_path):
    folder = _images(tmp_path)
    cfg = tiny_config("data.source=folder", f"data.path={folder}", "train.steps=2", "train.checkpoint_every=1",
                      "data.holdout=6")  # 6 training images: the 8 samples of 2 steps start a second epoch
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    state = json.loads((tmp_path / "run/checkpoints/step_00000002/state.json").read_text())
    assert state["data_position"] == {"micro_batch": 2, "images": 8, "pairs": 0, "images_epoch": 1}
    longer = tiny_config("data.source=folder", f"data.path={folder}", "train.steps=3", "data.holdout=6")
    resumed = Trainer(longer, tmp_path / "run", progress=False)
    resumed.resume()
    assert resumed.batches.start == DataPosition(2, 8, 0)


def _pairs_jsonl(folder):
    path = folder.parent / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": str(f), "caption": f.with_suffix(".txt").read_text()}) + "\n"
                            for f in sorted(folder.glob("0*.png"))))
    return path


def test_iomm_data_shards_writes_shards_that_train_as_images_and_as_pairs(tiny_config, tmp_path, capsys):
    folder = _images(tmp_path)
    (folder / "zz_broken.png").write_bytes(b"not an image")
    out = tmp_path / "shards"
    assert main(["data", "shards", "--input", str(folder), "--out", str(out), "--resolution", "32",
                 "--per-shard", "5", "--format", "png", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    summary = json.loads((out / "shards.json").read_text())
    assert summary["samples"] == N_IMAGES
    assert summary["data"]["skipped"] == {"unreadable image (UnidentifiedImageError)": 1}
    assert "1 skipped" in capsys.readouterr().out
    cfg = tiny_config("data.source=webdataset", f"data.path={out}/{{000000..000002}}.tar", "data.holdout=0",
                      "train.mix_ratio=0.0", f"data.pairs=webdataset:{out}")
    sources = build_sources(cfg, run_dir=tmp_path / "run")
    originals = {_fingerprint(load_image(f, 32)): f"caption {int(f.stem)}" for f in sorted(folder.glob("0*.png"))}
    batch = MixedBatches(sources.images, sources.pairs, N_IMAGES, 0.0, seed=0)[0]
    assert {_fingerprint(image): caption for image, caption in zip(batch.images, batch.captions)} == originals
    assert list((tmp_path / "run").glob("shard_index_*.npz"))  # listed once, by the main rank


def test_iomm_data_shards_keeps_source_names_and_warns_when_pairs_lack_captions(tiny_config, tmp_path, capsys):
    folder = _images(tmp_path, n=4)
    (folder / "000.txt").unlink()
    (folder / "sub").mkdir()
    Image.new("RGB", (40, 40)).save(folder / "sub/x.png")  # no caption either: 3 of 5 captioned
    out = tmp_path / "shards"
    assert main(["data", "shards", "--input", str(folder), "--out", str(out), "--resolution", "32",
                 "--format", "png", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "captions: 3 of 5 samples" in printed and "warning: as data.pairs, the 2 without a caption (40%)" in printed
    assert "data: 5 samples read, none skipped" in printed
    assert json.loads((out / "shards.json").read_text())["captioned"] == 3
    with tarfile.open(out / "000000.tar") as tar:
        sources = [json.loads(tar.extractfile(m).read())["source"] for m in tar if m.name.endswith(".json")]
    assert sources == ["000.png", "001.png", "002.png", "003.png", "sub/x.png"]
    sources = build_sources(tiny_config("data.source=webdataset", f"data.path={out}/*.tar", "data.holdout=0"))
    assert len(sources.images.keep) == 5


def test_a_shard_glob_expands_sorted_and_one_matching_nothing_says_what_names_shards(tmp_path):
    from iomm.data.shards import expand_shards

    for name in ("b-001.tar", "a-000.tar", "b-000.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(f"{tmp_path}/*.tar") == [tmp_path / n for n in ("a-000.tar", "b-000.tar", "b-001.tar")]
    assert expand_shards(f"{tmp_path}/{{b,a}}-*.tar") == [tmp_path / n for n in ("b-000.tar", "b-001.tar", "a-000.tar")]
    works = r"; a glob \(shards/\*\.tar\), a brace pattern \(shard-\{000\.\.009\}\.tar\) or a directory"
    with pytest.raises(FileNotFoundError, match=r"no shard matches .*/c-\*\.tar \(1 missing\)" + works):
        expand_shards(f"{tmp_path}/c-*.tar")


def test_iomm_data_cache_prints_its_counts_and_the_bad_data_report(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import iomm.data.latent_cache
    import iomm.model
    from iomm.data.images import DataReport

    report = DataReport()
    report.ok()
    report.bad("data/broken.png", "unreadable image (UnidentifiedImageError)")
    info = {"samples": {"images": 53, "pairs": 30}, "data": report.to_dict()}
    monkeypatch.setattr(iomm.model, "load_mllm", lambda cfg: SimpleNamespace(device="cpu"))
    monkeypatch.setattr(iomm.model, "build_codec", lambda cfg: torch.nn.Identity())
    monkeypatch.setattr(iomm.data.latent_cache, "write_latent_cache", lambda *args, **kwargs: info)
    assert main(["data", "cache", "--out", str(tmp_path / "cache"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"cached 53 images, 30 pairs -> {tmp_path / 'cache'}" in printed
    assert report.summary() in printed  # as `iomm data shards` prints it


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(value):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_inside_shards_are_skipped_and_counted(tiny_config, tmp_path):
    shard = tmp_path / "bad.tar"
    _tar(shard, [("a.png", _png(10)), ("a.json", b'{"caption": "a red square"}'),
                 ("b.png", b"not a png"), ("b.json", b'{"caption": "x"}'),
                 ("c.png", _png(30)), ("c.json", b'{"other": 1}'),
                 ("d.txt", b"no image here")])
    cfg = tiny_config("data.source=webdataset", f"data.path={shard}", "data.holdout=0", "train.mix_ratio=0.0",
                      f"data.pairs=webdataset:{shard}", "data.caption_field=caption")
    sources = build_sources(cfg)
    bad: list = []
    samples = [sources.pairs.take(k, np.random.default_rng(0), bad) for k in range(4)]
    assert {caption for _, caption in samples} == {"a red square"}
    reasons = {reason for _, reason in bad}
    assert reasons == {"unreadable image (UnidentifiedImageError)", "empty or missing caption",
                       "sample has no jpg/jpeg/png/webp member"}
    assert all(str(shard) in where for where, _ in bad)


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_hugging_face_dataset_on_disk_or_as_parquet_trains(tiny_config, tmp_path):
    images = [{"bytes": _png_bytes(Image.new("RGB", (40, 36), (20 * i, 0, 0))), "path": None} for i in range(6)]
    images.append({"bytes": b"not an image", "path": None})
    table = datasets.Dataset.from_dict({"picture": images, "label": [f"caption {i}" for i in range(7)],
                                        "score": list(range(7))},
                                       features=datasets.Features({"picture": datasets.Image(),
                                                                   "label": datasets.Value("string"),
                                                                   "score": datasets.Value("int64")}))
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parquet").mkdir()
    table.to_parquet(str(tmp_path / "parquet/part-0.parquet"))
    for location in (tmp_path / "saved", tmp_path / "parquet"):
        cfg = tiny_config("data.source=hf", f"data.path={location}", "data.image_column=picture", "data.holdout=0",
                          "train.mix_ratio=0.0", f"data.pairs=hf:{location}", "data.caption_field=label")
        sources = build_sources(cfg)
        bad: list = []
        taken = [sources.pairs.take(k, np.random.default_rng(0), bad) for k in range(7)]  # one epoch
        assert bad == [(f"{location} (row 6)", "unreadable image (UnidentifiedImageError)")]
        good = {(round(float(image[0].mean()) * 255), caption) for image, caption in taken}
        assert {(20 * i, f"caption {i}") for i in range(6)} <= good  # the bad row's slot holds a good one
    with pytest.raises(BadSource, match="no column 'image' \\(columns: picture, label, score\\); set data.image_col"):
        build_sources(tiny_config("data.source=hf", f"data.path={tmp_path / 'saved'}"))
    with pytest.raises(BadSource, match="caption column 'score' is not text"):
        build_sources(tiny_config("data.source=hf", f"data.path={tmp_path / 'saved'}", "data.image_column=picture",
                                  "train.mix_ratio=0.5", f"data.pairs=hf:{tmp_path / 'saved'}",
                                  "data.caption_field=score"))


def test_a_shard_that_is_not_a_tar_or_an_empty_pattern_names_the_source(tiny_config, tiny_mllm_dir, tmp_path, capsys,
                                                                         monkeypatch):
    (tmp_path / "000000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BadSource, match="000000.tar: not a readable \\(uncompressed\\) tar shard"):
        build_sources(tiny_config("data.source=webdataset", f"data.path={tmp_path}/000000.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no .tar shards found"):
        build_sources(tiny_config("data.source=webdataset", f"data.path={tmp_path / 'empty'}"))
    with pytest.raises(FileNotFoundError, match="no such shard .*000001.tar \\(3 missing\\)"):
        build_sources(tiny_config("data.source=webdataset", f"data.path={tmp_path}/{{000000..000003}}.tar"))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: webdataset\n  path: {tmp_path}/000000.tar\n")
    import iomm.model

    def refuse(cfg):
        raise AssertionError("the model was built before the data was opened")

    monkeypatch.setattr(iomm.model, "load_mllm", refuse)
    argv = ["pretrain", "--config", str(config), "--set", f"mllm.path={tiny_mllm_dir}", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "not a readable (uncompressed) tar shard" in capsys.readouterr().err


def test_bad_data_settings_fail_before_any_compute(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="data.path.*a location for data.source=webdataset"):
        tiny_config("data.source=webdataset")
    with pytest.raises(ConfigError, match="data.pairs.*a location after 'hf:'"):
        tiny_config("data.pairs='hf:'", "train.mix_ratio=0.5")
    with pytest.raises(ConfigError, match="data.path.*an existing dataset directory"):
        tiny_config("data.source=hf", f"data.path={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="data.source.*one of 'folder', 'jsonl', 'webdataset', 'hf'"):
        tiny_config("data.source=tfrecord")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from iomm.nano.vae import tiny_config as tiny_vae_config
    from iomm.nano.vae import train_nano_vae

    return train_nano_vae(tmp_path_factory.mktemp("vae"), steps=2, config=tiny_vae_config(), progress=False)


def test_a_latent_cache_trains_with_the_online_loss(tiny_mllm_dir, tiny_vae_dir, tmp_path, capsys):
    from conftest import TINY_OVERRIDES

    from iomm.config_checks import load_config
    from iomm.model import IOMM

    folder = _images(tmp_path)
    (folder / "zz_broken.png").write_bytes(b"not an image")  # held out by the split: the grids skip it
    overrides = [f"mllm.path={tiny_mllm_dir}", *TINY_OVERRIDES, "codec.kind=vae", f"codec.path={tiny_vae_dir}",
                 "generator.patch_size=2", "data.source=folder", f"data.path={folder}", "data.holdout=3",
                 "train.mix_ratio=0.5", f"data.pairs={_pairs_jsonl(folder)}"]
    cache = tmp_path / "cache"
    assert main(["data", "cache", *(f"--set={o}" for o in overrides), "--out", str(cache), "--no-progress"]) == 0
    info = json.loads((cache / "cache.json").read_text())
    assert info["samples"] == {"images": N_IMAGES + 1 - 3, "pairs": N_IMAGES} and "--out" in info["command"]
    online, cached = load_config(None, overrides), load_config(None, [*overrides, f"data.latents={cache}"])
    torch.manual_seed(0)
    model = IOMM.from_config(online)
    for step in range(3):
        a = build_sources(online)
        b = build_sources(cached)
        assert torch.equal(a.held_out, b.held_out)  # pixels for the grids, from data.source
        pixels = MixedBatches(a.images, a.pairs, 6, 0.5, seed=0)[step]
        encoded = MixedBatches(b.images, b.pairs, 6, 0.5, seed=0)[step]
        assert pixels.captions == encoded.captions and not isinstance(encoded.images, torch.Tensor)
        loss = model.loss(pixels.images, pixels.captions, torch.Generator().manual_seed(step))
        torch.testing.assert_close(model.loss(encoded.images, encoded.captions, torch.Generator().manual_seed(step)),
                                   loss)
    trainer = Trainer(load_config(None, [*overrides, f"data.latents={cache}", "train.steps=2"]), tmp_path / "run",
                      progress=False)
    trainer.fit()
    assert (tmp_path / "run/checkpoints/step_00000002").is_dir()
    with pytest.raises(ConfigError, match="data.latents.*a cache made with data.resolution=64"):
        load_config(None, [*overrides, f"data.latents={cache}", "data.resolution=64"])
    with pytest.raises(ConfigError, match="data.latents.*a directory written by `iomm data cache`"):
        load_config(None, [*overrides, f"data.latents={tmp_path}"])


def test_a_parquet_folder_streams_in_epochs_and_resumes_at_a_position(tiny_config, tmp_path):
    rows = [{"bytes": _png_bytes(Image.new("RGB", (32, 32), (10 * i, 0, 0))), "path": None} for i in range(9)]
    rows[4] = {"bytes": b"broken", "path": None}
    table = datasets.Dataset.from_dict({"image": rows, "text": [f"caption {i}" for i in range(9)]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "text": datasets.Value("string")}))
    (tmp_path / "parquet").mkdir()
    for part in range(3):  # three files: the stream shuffles their order, then rows through its buffer
        table.select(range(3 * part, 3 * part + 3)).to_parquet(str(tmp_path / f"parquet/part-{part}.parquet"))
    cfg = tiny_config("data.source=hf", f"data.path={tmp_path / 'parquet'}", "data.streaming=true",
                      "data.stream_buffer=4", "train.mix_ratio=0.0", f"data.pairs=hf:{tmp_path / 'parquet'}")
    sources = build_sources(cfg)
    assert len(sources.held_out) == 0
    bad: list = []
    taken = [sources.pairs.take(p, np.random.default_rng(0), bad) for p in range(18)]  # two epochs
    reds = [[round(float(image[0].mean()) * 255) for image, _ in taken[e * 9:(e + 1) * 9]] for e in range(2)]
    for epoch in reds:  # the broken row's slot holds the first good row of the files, red 0
        assert sorted(epoch) == [0, 0, 10, 20, 30, 50, 60, 70, 80]
    assert len(bad) == 2
    assert reds[0] != reds[1] and all(reason == "unreadable image (UnidentifiedImageError)" for _, reason in bad)
    resumed = build_sources(cfg).pairs  # a fresh stream, read from position 11 on
    for p in range(11, 18):
        image, caption = resumed.take(p, np.random.default_rng(0), [])
        assert torch.equal(image, taken[p][0]) and caption == taken[p][1]
    with pytest.raises(ConfigError, match="data.streaming.*false unless data.source or data.pairs is hf"):
        tiny_config("data.streaming=true")


def test_stage2_draws_its_own_stream_instead_of_replaying_stage1(tiny_config, tmp_path):
    from iomm.checkpointing.checkpoint import resolve_checkpoint
    from iomm.checkpointing.manager import run_state
    from iomm.config_checks import finetune_config
    from iomm.per_sample_rng import sample_generators
    from iomm.training.trainer import Trainer

    fresh = ("data.pairs=world-fresh:1", "train.mix_ratio=0.0", "finetune.mix_ratio=0.0", "train.steps=2",
             "finetune.steps=2")
    stage1 = Trainer(tiny_config(*fresh), tmp_path / "pre", progress=False)
    stage1.fit()
    stage2 = Trainer(finetune_config(tiny_config(*fresh)), tmp_path / "ft", init=tmp_path / "pre", progress=False)
    assert (stage1.stream, stage2.stream) == (0, 1)
    assert stage2.batches.start == DataPosition(0, 0, 2 * 4)  # it goes on after stage 1's 2 steps x 4 pairs
    assert stage1.batches[0].captions != stage2.batches[0].captions  # the same seed, other pairs
    noise = [torch.randn(4, generator=sample_generators(0, 0, 0, range(1), stream)[0])
             for stream in (stage1.stream, stage2.stream)]
    assert not torch.equal(*noise)
    stage2.fit()
    assert run_state(resolve_checkpoint(tmp_path / "ft"))["stream"] == 1
    stage3 = Trainer(finetune_config(tiny_config(*fresh)), tmp_path / "ft2", init=tmp_path / "ft", progress=False)
    assert stage3.stream == 2 and stage3.batches[0].captions != stage2.batches[0].captions


def test_stage2_reads_the_items_stage1_has_not_read_yet(tiny_config, tmp_path):
    from iomm.config_checks import finetune_config
    from iomm.training.trainer import Trainer

    folder = _images(tmp_path)
    cfg = tiny_config("data.source=folder", f"data.path={folder}", "data.holdout=2", "train.steps=1",
                      "finetune.steps=1", "finetune.mix_ratio=1.0")
    stage1 = Trainer(cfg, tmp_path / "pre", progress=False)
    first = {_fingerprint(image) for image in stage1.batches[0].images}
    stage1.fit()
    stage2 = Trainer(finetune_config(cfg), tmp_path / "ft", init=tmp_path / "pre", progress=False)
    second = {_fingerprint(image) for image in stage2.batches[0].images}
    assert len(first) == len(second) == 4 and not first & second  # the next 4 of the epoch, not its first 4 again
