"""Start-up cost of an image folder at scale: list it, write the run's index, read it back, split off the
held-out files. The files are empty (listing never opens them), 1,000 per sub-folder.

    python -m iomm.lab.bench.probes.folder_listing --n 1000000 --out bench/results/folder_listing.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from iomm.data.folder_index import indexed_images, split_held_out
from iomm.data.images import list_images
from iomm.lab.bench.probes.report import command_line

PER_FOLDER = 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--out", default="runs/bench/folder_listing.json")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="iomm-folder-"))
    try:
        start = time.perf_counter()
        for i in range(args.n):
            folder = root / "images" / f"{i // PER_FOLDER:05d}"
            if i % PER_FOLDER == 0:
                folder.mkdir(parents=True)
            (folder / f"{i:08d}.jpg").touch()
        made = time.perf_counter() - start
        timings = {}
        images, run = root / "images", root / "run"
        for name, call in (("list_images", lambda: list_images(images)),
                           ("first_run_list_and_write_index", lambda: indexed_images(images, run)),
                           ("resume_read_index", lambda: indexed_images(images, run)),
                           ("other_rank_read_index", lambda: indexed_images(images, run, main=False))):
            start = time.perf_counter()
            files = call()
            timings[name] = round(time.perf_counter() - start, 2)
            assert len(files) == args.n
        start = time.perf_counter()
        split = split_held_out(files, 8)
        timings["split_held_out"] = round(time.perf_counter() - start, 2)
        command = command_line("folder_listing", ["--n", str(args.n), "--out", args.out])
        result = {"command": command, "files": args.n,
                  "seconds": timings, "held_out": len(split.held_out), "making_the_files_s": round(made, 1),
                  "index_bytes": os.path.getsize(root / "run" / "data_index.json"), "cpus": os.cpu_count()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
