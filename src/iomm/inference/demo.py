"""`iomm demo`: a Gradio app over an `IOMMPipeline`, four tabs: text-to-image, zero-shot editing, understanding
(the frozen MLLM answers), and reconstruction (the masked stage-1 condition next to its regeneration)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from iomm.data.images import BadSample, read_image
from iomm.inference.pipeline import IOMMPipeline

TITLE = "IOMM: image-only pre-training for unified multimodal models"
MAX_STEPS = 200
MAX_UPLOAD = "20mb"
OUTPUT_HEIGHT = 320  # pixels on the page: small models' images are shown enlarged, pixel for pixel
CSS = ".iomm-output img {height: 100%; width: auto; object-fit: contain; image-rendering: pixelated;}"


def build_demo(pipe: IOMMPipeline) -> Any:
    import gradio as gr

    cfg = pipe.cfg

    def refusal(message: str) -> Exception:
        """A message in the page for the user's input; the server log needs no traceback of it."""
        return gr.Error(message, print_exception=False)

    def seeded(seed: float | None) -> torch.Generator:
        return torch.Generator().manual_seed(int(seed or 0))

    def checked_steps(steps: float | None) -> int:
        if steps is None or not 1 <= steps <= MAX_STEPS:
            raise refusal(f"steps: expected 1 to {MAX_STEPS}, got {steps}")
        return int(steps)

    def opened(path: str | None, what: str) -> Image.Image:
        """An upload as an image, or a message in the page saying why it is not one."""
        if path is None:
            raise refusal(f"Upload {what} first.")
        try:
            return read_image(path)
        except BadSample as err:
            raise refusal(f"That upload is not a readable image: {err}") from None

    def text_to_image(prompt: str, steps: float, guidance: float, seed: float) -> Image.Image:
        if not prompt.strip():
            raise refusal("Type a prompt first.")
        return pipe(prompt, num_inference_steps=checked_steps(steps), guidance_scale=guidance,
                    generator=seeded(seed)).images[0]

    def edit(path: str | None, instruction: str, steps: float, guidance: float, seed: float) -> Image.Image:
        image = opened(path, "a reference image")
        if not instruction.strip():
            raise refusal("Type an instruction first.")
        return pipe(instruction, image=image, num_inference_steps=checked_steps(steps), guidance_scale=guidance,
                    generator=seeded(seed)).images[0]

    def understand(path: str | None, question: str) -> str:
        if not question.strip():
            raise refusal("Type a question first.")
        return pipe.answer(opened(path, "an image"), question)

    def reconstruct(path: str | None, ratio: float, seed: float) -> tuple[Image.Image, Image.Image]:
        if ratio is None or not 0.0 <= ratio < 1.0:
            raise refusal(f"mask ratio: expected 0 to below 1, got {ratio}")
        return pipe.reconstruct(opened(path, "an image"), ratio, generator=seeded(seed))

    def upload(label: str, elem_id: str | None = None) -> Any:
        """An image upload checked by iomm's own reader (gr.Image would fail on a bad file with a bare "Error"),
        with a preview of what was read."""
        file = gr.File(label=label, file_types=["image"], type="filepath", elem_id=elem_id)
        preview = gr.Image(label="as read", type="pil", interactive=False, height=160)
        file.upload(lambda path: opened(path, "an image"), file, preview)
        return file

    def sampling_controls() -> tuple[Any, Any, Any]:
        return (gr.Slider(1, MAX_STEPS, value=cfg.flow.sample_steps, step=1, label="steps"),
                gr.Slider(1.0, 10.0, value=cfg.flow.guidance_scale, step=0.5, label="guidance"),
                gr.Number(value=0, precision=0, label="seed"))

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{cfg.data.resolution} px model; the MLLM stays frozen.")
        with gr.Tab("Text to image"):
            prompt = gr.Textbox(label="prompt", elem_id="t2i-prompt")
            steps, guidance, seed = sampling_controls()
            button = gr.Button("Generate", elem_id="t2i-generate")
            output = gr.Image(label="image", type="pil", format="png", height=OUTPUT_HEIGHT, elem_id="t2i-image",
                              elem_classes="iomm-output")
            button.click(text_to_image, [prompt, steps, guidance, seed], output)
        with gr.Tab("Editing"):
            source = upload("reference image", "edit-source")
            instruction = gr.Textbox(label="instruction", elem_id="edit-instruction")
            steps, guidance, seed = sampling_controls()
            button = gr.Button("Edit", elem_id="edit-run")
            edited = gr.Image(label="edited", type="pil", format="png", height=OUTPUT_HEIGHT,
                              elem_classes="iomm-output")
            button.click(edit, [source, instruction, steps, guidance, seed], edited)
        with gr.Tab("Understanding"):
            picture = upload("image")
            question = gr.Textbox(label="question", value="what color is the shape?")
            button = gr.Button("Ask")
            answer = gr.Textbox(label="answer")
            button.click(understand, [picture, question], answer)
        with gr.Tab("Reconstruction"):
            original = upload("image")
            ratio = gr.Slider(0.0, 0.95, value=cfg.masking.ratio, step=0.05, label="mask ratio")
            seed = gr.Number(value=0, precision=0, label="seed")
            button = gr.Button("Regenerate")
            with gr.Row():
                masked = gr.Image(label="masked condition", type="pil", format="png", height=OUTPUT_HEIGHT,
                                  elem_classes="iomm-output")
                regenerated = gr.Image(label="regenerated", type="pil", format="png", height=OUTPUT_HEIGHT,
                                       elem_classes="iomm-output")
            button.click(reconstruct, [original, ratio, seed], [masked, regenerated])
    return demo


def launch(model: str, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True) -> Any:
    """Serve the demo on `host:port` (loopback unless asked); a public share link only with `share`."""
    demo = build_demo(IOMMPipeline.from_pretrained(model))
    # quiet: Gradio's own lines would tell the user to "set `share=True` in `launch()`"
    demo.queue().launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                        max_file_size=MAX_UPLOAD, css=CSS, quiet=True)
    print(f"* the demo: {demo.local_url}" + ("" if share else " (--share for a public link too)"), flush=True)
    if block:
        demo.block_thread()
    return demo


# Headless Chromium as the project's browser tests start it: no sandbox (root in CI), and no background
# connections (this machine's network is closed; Chromium would retry them at every start).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def demo_page(url: str, chromium: str = "/usr/bin/chromium", timeout_s: float = 120) -> Iterator[Any]:
    """The running demo at `url` in headless Chromium (Playwright driving the system's Chromium)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def generate_in_page(page: Any, prompt: str, screenshot: str | Path | None = None) -> Image.Image:
    """Type `prompt` into the text-to-image tab, click Generate, wait for the image, save a screenshot of the
    page, and return the image the page shows (fetched at its own resolution)."""
    page.locator("#t2i-prompt textarea").fill(prompt)
    page.locator("#t2i-generate").click()
    shown = page.locator("#t2i-image img")
    shown.wait_for(state="visible")
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=shown.element_handle())
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)
    return Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body())).convert("RGB")
