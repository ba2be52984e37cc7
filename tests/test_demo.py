"""`iomm demo` in a real browser: the Gradio app on a tiny trained model, driven by headless Chromium (the
system's, through Playwright): type a prompt, click Generate, and get the pipeline's own image back; bad input
gets a message in the page."""

import shutil
import socket

import numpy as np
import pytest
import torch

from iomm.inference.demo import demo_page, generate_in_page, launch
from iomm.inference.pipeline import IOMMPipeline
from iomm.training.trainer import Trainer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_text_to_image_in_a_real_browser(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=2"), tmp_path / "run", progress=False).fit()
    port = _port()
    demo = launch(str(tmp_path / "run"), port=port, block=False)
    try:
        with demo_page(f"http://127.0.0.1:{port}/", CHROMIUM) as page:
            page.locator("#t2i-generate").click()  # no prompt yet
            page.get_by_text("Type a prompt first.").first.wait_for()
            shown = generate_in_page(page, "a red circle", tmp_path / "demo.png")
            page.get_by_role("tab", name="Editing").click()
            (tmp_path / "notes.png").write_bytes(b"not an image, whatever its name says")
            page.locator("#edit-source input[type=file]").set_input_files(str(tmp_path / "notes.png"))
            page.locator("#edit-instruction textarea").fill("make it blue")
            page.locator("#edit-run").click()
            page.get_by_text("not a readable image").first.wait_for()
    finally:
        demo.close()
    assert shown.size == (32, 32)  # the model's resolution, not the page's display size
    pipe = IOMMPipeline.from_pretrained(tmp_path / "run")
    expected = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(shown), np.asarray(expected))  # the page defaults: steps, guidance, seed 0
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_the_server_log_says_share_and_keeps_refused_input_to_the_page(tiny_config, tmp_path, capfd):
    from gradio_client import Client

    Trainer(tiny_config("train.steps=2"), tmp_path / "run", progress=False).fit()
    port = _port()
    demo = launch(str(tmp_path / "run"), port=port, block=False)
    try:
        with pytest.raises(Exception, match="Type a prompt first."):
            Client(f"http://127.0.0.1:{port}/", verbose=False).predict("", 3, 1.0, 0, api_name="/text_to_image")
    finally:
        demo.close()
    log = "".join(capfd.readouterr())
    assert f"http://127.0.0.1:{port}" in log and "--share" in log
    assert "share=True" not in log and "Traceback" not in log, log
