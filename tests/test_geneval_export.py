import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iomm.commands import eval as eval_commands
from iomm.evaluation.geneval_export import load_prompts, write_geneval_layout, write_one_per_prompt
from iomm.nano.prompts import eval_prompts
from iomm.nano.scorer import score_directory
from iomm.nano.world import World

# 12 lines copied verbatim from GenEval's prompts/evaluation_metadata.jsonl (MIT, Dhruba Ghosh), two per tag
GENEVAL_METADATA = Path(__file__).parent / "fixtures" / "geneval_evaluation_metadata.jsonl"
GENEVAL_TAGS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def dummy_generate(prompts: list[str], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in prompts]


@pytest.fixture
def geneval_head(tmp_path) -> Path:
    head = tmp_path / "evaluation_metadata.jsonl"
    head.write_bytes(GENEVAL_METADATA.read_bytes())
    return head


def test_geneval_layout_is_what_the_official_scorer_reads(tmp_path, geneval_head):
    out = tmp_path / "geneval"
    folders = write_geneval_layout(geneval_head, out, dummy_generate, n_samples=4)
    lines = [json.loads(x) for x in geneval_head.read_text().splitlines()]
    assert {m["tag"] for m in lines} == GENEVAL_TAGS  # the fixture covers every GenEval task
    assert [f.name for f in folders] == [f"{i:05d}" for i in range(len(lines))] and len(lines) == 12
    # the official evaluate_images.py walks the folders exactly like this
    for subfolder in sorted(os.listdir(out)):
        assert subfolder.isdigit()
        with open(out / subfolder / "metadata.jsonl") as fp:
            assert json.load(fp) == lines[int(subfolder)]
        samples = sorted(os.listdir(out / subfolder / "samples"))
        assert samples == ["0000.png", "0001.png", "0002.png", "0003.png"]
        assert all(re.match(r"\d+\.png", name) for name in samples)
    first = np.asarray(Image.open(out / "00000/samples/0000.png"))
    assert first.shape == (16, 16, 3)
    assert not np.array_equal(first, np.asarray(Image.open(out / "00001/samples/0000.png")))  # seed per prompt


def test_generate_fn_returning_the_wrong_count_is_an_error(tmp_path, geneval_head):
    with pytest.raises(ValueError, match="returned 1 images for 4 prompts"):
        write_geneval_layout(geneval_head, tmp_path / "o", lambda prompts, seed: dummy_generate(["x"], seed))


def test_world_prompts_in_geneval_layout_score_with_the_shapes_scorer(tmp_path):
    prompts = eval_prompts(per_category=2, seed=0)
    metadata = tmp_path / "prompts.jsonl"
    metadata.write_text("".join(json.dumps(m) + "\n" for m in prompts))
    world, rng = World(), np.random.default_rng(0)
    by_prompt = {m["prompt"]: m for m in prompts}

    def render(texts: list[str], seed: int) -> list[Image.Image]:
        return [Image.fromarray(world.render(world.scene_from_prompt(by_prompt[t], rng))) for t in texts]

    write_geneval_layout(metadata, tmp_path / "out", render, n_samples=2)
    metrics = score_directory(tmp_path / "out")
    assert metrics["overall"] >= 0.98 and sum(c["n"] for c in metrics["counts"].values()) == 28
    assert metrics["compositions"] >= 0.98  # the held-out compositions render and score like GenEval's tags


def test_dpg_one_image_per_prompt_file(tmp_path):
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    for stem in ("partiprompts1", "countbench7", "whoops3"):
        (prompts_dir / f"{stem}.txt").write_text(f"a prompt for {stem}\n")
    assert load_prompts(prompts_dir, "dpg")[0] == ("countbench7", "a prompt for countbench7")
    written = write_one_per_prompt(prompts_dir, tmp_path / "dpg", dummy_generate, naming="dpg", n_samples=4)
    assert sorted(p.name for p in written) == ["countbench7.png", "partiprompts1.png", "whoops3.png"]
    assert Image.open(tmp_path / "dpg/whoops3.png").size == (32, 32)  # 2x2 grid of 16 px tiles
    single = write_one_per_prompt([("a1", "a red circle")], tmp_path / "one", dummy_generate, naming="dpg")
    assert Image.open(single[0]).size == (16, 16)
    with pytest.raises(ValueError, match="n_samples"):
        write_one_per_prompt(prompts_dir, tmp_path / "x", dummy_generate, naming="dpg", n_samples=3)


def test_wise_images_named_by_prompt_id(tmp_path):
    records = [{"prompt_id": 1, "Prompt": "a clock at noon", "Explanation": "", "Subcategory": "time"},
               {"prompt_id": 42, "Prompt": "ice melting", "Explanation": "", "Subcategory": "physics"}]
    path = tmp_path / "natural_science.json"
    path.write_text(json.dumps(records))
    written = write_one_per_prompt(path, tmp_path / "wise", dummy_generate, naming="wise")
    assert [p.name for p in written] == ["1.png", "42.png"]
    path.write_text(json.dumps([{"id": 3, "prompt": "x"}]))
    with pytest.raises(ValueError, match="prompt_id"):
        write_one_per_prompt(path, tmp_path / "wise2", dummy_generate, naming="wise")


def test_bad_metadata_fails_before_anything_is_generated(tmp_path):
    calls = []

    def generate(prompts: list[str], seed: int) -> list[Image.Image]:
        calls.append(prompts)
        return dummy_generate(prompts, seed)

    metadata = tmp_path / "evaluation_metadata.jsonl"
    good = json.dumps({"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a bench"})
    for bad, message in (("{not json", r"metadata.jsonl:2: invalid JSON"),
                         (json.dumps({"tag": "single_object"}), r"metadata.jsonl:2: field 'prompt'")):
        metadata.write_text(f"{good}\n{bad}\n")
        with pytest.raises(ValueError, match=message):
            write_geneval_layout(metadata, tmp_path / "out", generate)
    with pytest.raises(FileNotFoundError, match="no such metadata file"):
        write_geneval_layout(tmp_path / "missing.jsonl", tmp_path / "out", generate)
    with pytest.raises(ValueError, match="duplicates"):
        write_one_per_prompt([("7", "a"), ("7", "b")], tmp_path / "wise", generate, naming="wise")
    assert calls == [] and not (tmp_path / "out").exists()


def test_export_command_writes_each_official_layout_with_a_real_model(tiny_config, tmp_path):
    from iomm.training.trainer import Trainer

    Trainer(tiny_config("train.steps=1"), tmp_path / "run", progress=False).fit()
    parser = argparse.ArgumentParser()
    eval_commands.register(parser.add_subparsers(dest="command"))

    def export(*argv: str) -> int:
        args = parser.parse_args(["eval", "export", *argv, "--model", str(tmp_path / "run"), "--steps", "2"])
        return args.func(args)

    prompts = eval_prompts(per_category=1, seed=0)  # the world's own prompts: the shapes scorer reads the result
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(m) + "\n" for m in prompts))
    assert export("geneval", "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "g"),
                  "--samples", "2") == 0
    assert sorted(os.listdir(tmp_path / "g")) == [f"{i:05d}" for i in range(7)]  # GenEval's 6 + compositions
    assert sorted(os.listdir(tmp_path / "g/00006/samples")) == ["0000.png", "0001.png"]
    assert Image.open(tmp_path / "g/00000/samples/0000.png").size == (32, 32)
    assert sum(c["n"] for c in score_directory(tmp_path / "g")["counts"].values()) == 14

    dpg = tmp_path / "dpg_prompts"
    dpg.mkdir()
    for stem in ("countbench7", "whoops3"):
        (dpg / f"{stem}.txt").write_text(f"a photo of a red circle ({stem})\n")
    assert export("dpg", "--prompts", str(dpg), "--out", str(tmp_path / "d")) == 0
    assert sorted(os.listdir(tmp_path / "d")) == ["countbench7.png", "whoops3.png"]
    assert Image.open(tmp_path / "d/whoops3.png").size == (64, 64)  # the --pic-num 4 grid of 32 px tiles

    wise = []
    for name, ids in (("cultural_common_sense.json", (1, 2)), ("natural_science.json", (701,))):
        (tmp_path / name).write_text(json.dumps([{"prompt_id": i, "Prompt": f"prompt {i}", "Explanation": "",
                                                  "Subcategory": "x"} for i in ids]))
        wise.append(str(tmp_path / name))
    assert export("wise", "--prompts", *wise, "--out", str(tmp_path / "w")) == 0
    assert sorted(os.listdir(tmp_path / "w")) == ["1.png", "2.png", "701.png"]
    assert Image.open(tmp_path / "w/701.png").size == (32, 32)

    with pytest.raises(SystemExit, match="geneval takes one"):
        export("geneval", "--prompts", *wise, "--out", str(tmp_path / "x"))
