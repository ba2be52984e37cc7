"""`iomm demo`: the Gradio app (text-to-image, editing, understanding, reconstruction) on a model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="a web demo (Gradio) on a run, checkpoint or exported pipeline")
    p.add_argument("--model", required=True, help="run dir, checkpoint dir, or an `iomm export` directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--screenshot", metavar="PNG", help="instead of serving: generate --prompt in headless Chromium "
                   "(Playwright, the system's chromium), save a screenshot of the page, and exit")
    p.add_argument("--prompt", default="a red circle", help="the prompt --screenshot types")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import shutil

    from iomm.inference.demo import demo_page, generate_in_page, launch

    if args.screenshot is None:
        launch(args.model, host=args.host, port=args.port, share=args.share)
        return 0
    demo = launch(args.model, host=args.host, port=args.port, block=False)
    try:
        with demo_page(f"http://{args.host}:{args.port}/", shutil.which("chromium") or "/usr/bin/chromium") as page:
            image = generate_in_page(page, args.prompt, args.screenshot)
    finally:
        demo.close()
    print(f"the page showed a {image.width}x{image.height} image for {args.prompt!r}; wrote {args.screenshot}")
    return 0
