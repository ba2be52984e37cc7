"""Conditioning-path probe: where along stage 1's condition path is the image's information lost?

Held-out world scenes (a seed training never draws) go through the condition path of a trained run,
recomputed with the library's own calls in IOMM.encode's order (no library code changed):

    pixels            the image itself (reference row)
    vision            image tokens the LLM sees (mllm.embed_images; masked tokens zeroed when --ratio > 0)
    vision_mean       their mean over tokens (reference row: an order-blind summary, like the adapter's output)
    llm_image         the frozen LLM's last hidden states at the image positions of the packed condition
    queries           the Residual Query Adapter's output tokens
    llm_queries       the LLM's hidden states at the query positions (the connector's input)
    connector         the connector's tokens (the generator's cross-attention input)
    connector_pooled  the connector's pooled token

Linear read-outs (closed-form ridge on standardised, flattened tokens; lambda chosen on a validation cut
of the train split; dual form when the feature dimension exceeds the sample count) of scene facts:
colours present (per-colour and exact set), count of each shape, colour and 3x3 grid cell of the largest
object (ties: first in scene order; `*_untied` scores only test scenes without a tie). Two diagnostics:
the adapter's order-blindness (relative change of its output when the image tokens are permuted, also
followed down the path) and the mirror distance ||f(flip x) - f(x)|| / ||f(y) - f(x)|| for an unrelated y
(near 0: the stage cannot tell an image from its left-right mirror, so it has lost the horizontal layout).
A flattened linear probe needs a detector per token position for position-free facts (colours, counts),
so with ~1k samples it can score below a pooled row (vision_mean) on those: compare rows per target.

    cd /tmp/cold && OMP_NUM_THREADS=1 python -m iomm.lab.bench.probes.condition --model runs/nano/pretrain \
        --n-train 1500 --n-test 500 --ratio 0 --out /work/main/bench/results/condition_probe/nano_recipe_pretrain.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from iomm.conditioning.sequence import Segment, pack_left, positions_after
from iomm.image_tensors import to_tensor
from iomm.inference.pipeline import load_model
from iomm.model import IOMM
from iomm.nano.world import COLORS, SHAPES, Scene, World, WorldConfig

STAGES = ("pixels", "vision", "vision_mean", "llm_image", "queries", "llm_queries", "connector", "connector_pooled")
LAMBDAS = (1e-2, 1.0, 1e2, 1e4)
RES = 32
COLOR_NAMES = tuple(COLORS)
MAX_COUNT = 4


# ---------------------------------------------------------------- the condition path, stage by stage


def _marker(segment: Segment, offset: int) -> Segment:
    """The segment with its embeddings replaced by each token's index in the unpacked layout."""
    b, n = segment.valid.shape
    index = (torch.arange(n, dtype=torch.float32) + offset).view(1, n, 1).expand(b, n, 1)
    return Segment(index.to(segment.valid.device), segment.valid, segment.counts_position)


@torch.no_grad()
def condition_stages(model: IOMM, images: torch.Tensor, ratio: float, seed: int,
                     perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every stage of IOMM.condition_masked_images on `images`, as IOMM.encode computes it.

    `perm` (B, N_img): image tokens reordered per sample before packing (order-blindness diagnostic).
    """
    b = images.shape[0]
    prompt = model.text_segment([model.cfg.masking.prompt] * b)
    tokens = model.mllm.embed_images(images)
    image = model.image_segment(tokens, model.keep_mask(tokens, torch.Generator().manual_seed(seed), ratio))
    if perm is not None:
        take = perm.to(image.embeds.device)
        image = Segment(image.embeds.gather(1, take.unsqueeze(-1).expand_as(image.embeds)), image.valid.gather(1, take),
                        None if image.counts_position is None else image.counts_position.gather(1, take))
    n_img, n_prompt = image.embeds.shape[1], prompt.embeds.shape[1]
    packed = pack_left([prompt, image])
    origin = pack_left([_marker(prompt, 0), _marker(image, n_prompt)]).embeds[..., 0].round().long() - n_prompt
    out = {"pixels": images.flatten(1), "vision": image.embeds * image.valid.unsqueeze(-1).to(image.embeds.dtype)}
    hidden = model.mllm.forward_embeds(packed.embeds, packed.mask, packed.llm_positions)
    rows, cols = (packed.mask & (origin >= 0)).nonzero(as_tuple=True)
    llm_image = hidden.new_zeros(b, n_img, hidden.shape[-1])  # masked-out (dropped) tokens stay 0
    llm_image[rows, origin[rows, cols]] = hidden[rows, cols]
    out.update(vision_mean=out["vision"].mean(1), llm_image=llm_image)
    if model.adapter is None:
        raise SystemExit("condition_probe: the run has no query adapter (adapter.kind: raw)")
    queries = model.adapter(packed.embeds, packed.mask, packed.positions)  # as IOMM.encode calls it
    hidden = model.mllm.forward_suffix(packed.embeds, packed.mask, packed.llm_positions,
                                       queries, positions_after(packed, queries.shape[1]))
    tokens, pooled = model.connector(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device))
    out.update(queries=queries, llm_queries=hidden, connector=tokens, connector_pooled=pooled)
    return {k: v.detach().float().cpu() for k, v in out.items()}


@torch.no_grad()
def check_against_model(model: IOMM, images: torch.Tensor, ratio: float, seed: int) -> float:
    """Max |difference| between the captured connector output and model.condition_masked_images'."""
    cond = model.condition_masked_images(images, torch.Generator().manual_seed(seed), ratio=ratio)
    ours = condition_stages(model, images, ratio, seed)
    return max(float((cond.tokens.float().cpu() - ours["connector"]).abs().max()),
               float((cond.pooled.float().cpu() - ours["connector_pooled"]).abs().max()))


def run_path(model: IOMM, images: torch.Tensor, ratio: float, seed: int, batch: int,
             perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch):
        p = None if perm is None else perm[i:i + batch]
        for k, v in condition_stages(model, images[i:i + batch], ratio, seed + i, p).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------- targets


def largest(scene: Scene) -> tuple[int, bool]:
    """Index of the largest object (first in scene order on a tie) and whether there was a tie."""
    extents = [o.extent for o in scene.objects]
    top = max(extents)
    return extents.index(top), extents.count(top) > 1


def targets(scenes: list[Scene]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Integer labels per target group ((n, 6) 0/1 for colours_present, (n,) classes otherwise), tie flags."""
    labels: dict[str, list] = {"colors_present": []}
    labels.update({f"count_{s}": [] for s in SHAPES})
    labels.update(largest_color=[], largest_cell=[])
    ties = []
    for scene in scenes:
        colors = {o.color for o in scene.objects}
        labels["colors_present"].append([int(c in colors) for c in COLOR_NAMES])
        for s in SHAPES:
            labels[f"count_{s}"].append(sum(o.shape == s for o in scene.objects))
        i, tie = largest(scene)
        obj = scene.objects[i]
        labels["largest_color"].append(COLOR_NAMES.index(obj.color))
        row, col = (min(int(np.floor(3 * v / RES)), 2) for v in (obj.cy, obj.cx))
        labels["largest_cell"].append(3 * row + col)
        ties.append(tie)
    return {k: np.asarray(v) for k, v in labels.items()}, np.asarray(ties)


CLASSES = {"colors_present": 2, **{f"count_{s}": MAX_COUNT + 1 for s in SHAPES},
           "largest_color": len(COLOR_NAMES), "largest_cell": 9}


def design(labels: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, slice]]:
    """Regression targets: the 6 colour indicators, then a one-hot block per classification group."""
    blocks, where, start = [], {}, 0
    for name, y in labels.items():
        block = y.astype(np.float64) if name == "colors_present" else np.eye(CLASSES[name])[y]
        blocks.append(block)
        where[name] = slice(start, start + block.shape[1])
        start += block.shape[1]
    return np.concatenate(blocks, 1), where


def scores(name: str, pred: np.ndarray, y: np.ndarray, subset: np.ndarray | None = None) -> dict[str, float]:
    if subset is not None:
        pred, y = pred[subset], y[subset]
    if name == "colors_present":
        hit = (pred > 0.5) == (y == 1)
        return {"colors_present": float(hit.mean()), "colors_exact": float(hit.all(1).mean())}
    return {name: float((pred.argmax(1) == y).mean())}


def baseline(train: dict[str, np.ndarray], test: dict[str, np.ndarray], untied: np.ndarray) -> dict[str, float]:
    """Majority class of the train split, scored on the test split (per colour and exact set for colours)."""
    out = {}
    for name, y in train.items():
        if name == "colors_present":
            major = (y.mean(0) > 0.5).astype(int)
            sets, counts = np.unique(y, axis=0, return_counts=True)
            out["colors_present"] = float((test[name] == major).mean())
            out["colors_exact"] = float((test[name] == sets[counts.argmax()]).all(1).mean())
        else:
            major = np.bincount(y, minlength=CLASSES[name]).argmax()
            out[name] = float((test[name] == major).mean())
            if name.startswith("largest"):
                out[name + "_untied"] = float((test[name][untied] == major).mean())
    return finish(out)


def finish(row: dict[str, float]) -> dict[str, float]:
    row["shape_counts"] = float(np.mean([row[f"count_{s}"] for s in SHAPES]))
    order = ["colors_present", "colors_exact", *(f"count_{s}" for s in SHAPES), "shape_counts",
             "largest_color", "largest_color_untied", "largest_cell", "largest_cell_untied"]
    return {k: row[k] for k in order}


# ---------------------------------------------------------------- ridge probes


def ridge_predictions(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray) -> dict[float, np.ndarray]:
    """Ridge predictions for every lambda in LAMBDAS (features standardised on x_fit, intercept = mean of y)."""
    mu, sd = x_fit.mean(0), x_fit.std(0)
    sd[sd < 1e-8] = 1.0
    a, e = (x_fit - mu) / sd, (x_eval - mu) / sd
    y_mean = y_fit.mean(0)
    yc = y_fit - y_mean
    if a.shape[1] > a.shape[0]:  # dual: W = A^T (A A^T + lam)^-1 y
        s, u = np.linalg.eigh(a @ a.T)
        proj, left = u.T @ yc, (e @ a.T) @ u
    else:  # primal: W = (A^T A + lam)^-1 A^T y
        s, u = np.linalg.eigh(a.T @ a)
        proj, left = u.T @ (a.T @ yc), e @ u
    return {lam: left @ (proj / (np.clip(s, 0, None) + lam)[:, None]) + y_mean for lam in LAMBDAS}


def probe(x_train: np.ndarray, x_test: np.ndarray, train: dict[str, np.ndarray], test: dict[str, np.ndarray],
          untied: np.ndarray, val_fraction: float = 0.2) -> tuple[dict[str, float], dict[str, float]]:
    """Test accuracy per target, lambda chosen per target group on a validation cut of the train split."""
    y_train, where = design(train)
    n_val = int(len(x_train) * val_fraction)
    cut = len(x_train) - n_val
    val_preds = ridge_predictions(x_train[:cut], y_train[:cut], x_train[cut:])
    test_preds = ridge_predictions(x_train, y_train, x_test)
    row, chosen = {}, {}
    for name, cols in where.items():
        key = "colors_present" if name == "colors_present" else name
        val_y = train[name][cut:]
        best = max(LAMBDAS, key=lambda lam: scores(name, val_preds[lam][:, cols], val_y)[key])
        chosen[name] = best
        pred = test_preds[best][:, cols]
        row.update(scores(name, pred, test[name]))
        if name.startswith("largest"):
            row[name + "_untied"] = scores(name, pred, test[name], untied)[name]
    return finish(row), chosen


# ---------------------------------------------------------------- diagnostics


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of ||a - b|| / ||a||."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return float(((a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)).mean())


def mirror_distance(f: torch.Tensor, f_mirror: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over pairs (x, unrelated y) of ||f(mirror x) - f(x)|| / ||f(y) - f(x)||."""
    f, f_mirror = f.flatten(1).double(), f_mirror.flatten(1).double()
    f_other = f[other]
    return float(((f_mirror - f).norm(dim=1) / (f_other - f).norm(dim=1).clamp_min(1e-12)).mean())


# ---------------------------------------------------------------- main


def table(rows: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(rows.values())))
    lines = ["| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {stage} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |" for stage, row in rows.items()]
    return "\n".join(lines)


def command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    return (env + " " if env else "") + shlex.join(argv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/nano/pretrain", help="run dir or checkpoint dir (EMA weights)")
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--ratio", type=float, default=0.0, help="masking ratio of the image tokens (0: unmasked)")
    p.add_argument("--seed", type=int, default=12345, help="world stream seed (training never draws it)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args()
    start = time.time()
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    stream = World(WorldConfig(resolution=RES, max_objects=model.cfg.data.world_max_objects)).images(args.seed)
    drawn = list(itertools.islice(stream, args.n_train + args.n_test))
    if model.cfg.data.resolution != RES:
        raise SystemExit(f"condition_probe: the run's resolution is {model.cfg.data.resolution}, expected {RES}")
    images = to_tensor([image for image, _ in drawn])
    labels, ties = targets([scene for _, scene in drawn])
    split = {k: (v[:args.n_train], v[args.n_train:]) for k, v in labels.items()}
    train, test = {k: v[0] for k, v in split.items()}, {k: v[1] for k, v in split.items()}
    untied = ~ties[args.n_train:]

    check = check_against_model(model, images[:8], args.ratio, args.seed)
    if check > 1e-4:
        raise SystemExit(f"condition_probe: captured path differs from condition_masked_images by {check:.2e}")
    test_images, test_seed = images[args.n_train:], args.seed + args.n_train  # test masks: the same in every pass
    train_feats = run_path(model, images[:args.n_train], args.ratio, args.seed, args.batch)
    test_feats = run_path(model, test_images, args.ratio, test_seed, args.batch)
    t_path = time.time() - start
    mirrored = run_path(model, test_images.flip(-1), args.ratio, test_seed, args.batch)
    n_img = test_feats["vision"].shape[1]
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.stack([torch.randperm(n_img, generator=g) for _ in range(args.n_test)])
    permuted = run_path(model, test_images, args.ratio, test_seed, args.batch, perm)

    other = torch.roll(torch.arange(args.n_test), 1)  # an unrelated scene for each test scene
    mirror = {k: mirror_distance(test_feats[k], mirrored[k], other) for k in STAGES}
    order = {k: relative_change(test_feats[k], permuted[k])
             for k in ("queries", "llm_queries", "connector", "connector_pooled")}

    probes, lambdas, dims = {}, {}, {}
    for stage in STAGES:
        dims[stage] = list(test_feats[stage].shape[1:])
        x_train, x_test = (f[stage].flatten(1).double().numpy() for f in (train_feats, test_feats))
        probes[stage], lambdas[stage] = probe(x_train, x_test, train, test, untied)
        print(f"[{time.time() - start:6.1f}s] {stage}: {probes[stage]}", file=sys.stderr, flush=True)
    base = baseline(train, test, untied)

    result = {
        "command": command_line(),
        "cwd": os.getcwd(),
        "model": args.model,
        "ratio": args.ratio,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "seed": args.seed,
        "baseline": base,
        "probes": probes,
        "order_blindness": order["queries"],
        "order_change": order,
        "mirror_distance": mirror,
        "tie_rate": {"all": float(ties.mean()), "test": float(ties[args.n_train:].mean())},
        "chosen_lambda": lambdas,
        "lambdas": list(LAMBDAS),
        "feature_shapes": dims,
        "path_check_max_abs_diff": check,
        "seconds": {"condition_path": round(t_path, 1), "total": round(time.time() - start, 1)},
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table({**probes, "majority baseline": base}))
    print("\norder change (image tokens permuted): " + ", ".join(f"{k} {v:.3g}" for k, v in order.items()))
    print("mirror distance: " + ", ".join(f"{k} {v:.3f}" for k, v in mirror.items()))
    print(f"largest-object tie rate {result['tie_rate']['all']:.3f}; {result['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
