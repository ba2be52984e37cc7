"""Oracle arms: stage 1 with one stage of the condition path bypassed, to find which link loses the layout.

Each arm trains the nano recipe's stage 1 (the same trainer, config, seed, data and steps as
`iomm pretrain --config configs/nano.yaml`) with the generator conditioned on something the paper's path
does not give it, then scores its regenerations with `iomm eval reconstruct`'s metric (the held-out stream,
ratio 0 and the training ratio). The condition is built from the image alone, so no arm transfers to text:
they bound what stage 1 could carry, they are not a method.

    vision     the vision tokens (masked as in training) straight into the connector: no LLM, no adapter
    llm_image  the frozen LLM's last hidden states at the image positions of the packed condition
               (prompt + masked image, as the paper's path packs it), no adapter and no queries

Both set `connector.token_positions` (a learned index embedding per token, started at sin-cos), so each
image token arrives with its place; `--set` adds any other override to every arm (e.g. masking.ratio=0 for
the unmasked condition, train.steps=2200 for a longer generator budget).

    cd DIR_WITH_THE_NANO_CACHES && OMP_NUM_THREADS=1 python -m iomm.lab.bench.probes.oracle_arms --arm vision \
        --out runs/oracle-vision --n 256 --result /work/main/bench/results/oracle_arms/vision.json
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import torch

from iomm.conditioning.sequence import pack_left
from iomm.config import Config
from iomm.config_checks import load_config
from iomm.evaluation.sample_grid import sample_grid
from iomm.inference.pipeline import load_model
from iomm.lab.bench.probes.report import write_report
from iomm.model import IOMM, Condition
from iomm.nano.reconstruction import evaluate_reconstruction
from iomm.training.trainer import Trainer

ARMS = ("vision", "llm_image")
NANO = Path(str(resources.files("iomm") / "configs" / "nano.yaml"))  # the packaged copy of configs/nano.yaml


class OracleIOMM(IOMM):
    """IOMM whose stage-1 condition bypasses the adapter (and, for `vision`, the LLM)."""

    arm = "vision"

    def condition_masked_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                                ratio: float | None = None) -> Condition:
        tokens = self.mllm.embed_images(images)
        image = self.image_segment(tokens, self.keep_mask(tokens, generator,
                                                          self.cfg.masking.ratio if ratio is None else ratio))
        if self.arm == "vision":
            hidden = image.embeds
        else:
            prompt = self.text_segment([self.cfg.masking.prompt] * images.shape[0])
            packed = pack_left([prompt, image])
            with torch.no_grad():  # nothing before the connector trains in these arms
                hidden = self.mllm.forward_embeds(packed.embeds, packed.mask, packed.llm_positions)
            hidden = hidden[:, -tokens.shape[1]:]  # left padded: the image tokens are the last positions
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return Condition(*self.connector(hidden, mask))


def oracle_model_fn(arm: str):
    def build(cfg: Config) -> IOMM:
        cls = type(f"Oracle_{arm}", (OracleIOMM,), {"arm": arm})
        return cls.from_config(cfg)
    return build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=ARMS, required=True)
    parser.add_argument("--config", type=Path, default=NANO)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True, help="run directory (resumes)")
    parser.add_argument("--n", type=int, default=256, help="held-out scenes regenerated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--result", type=Path, required=True, help="fidelity JSON")
    args = parser.parse_args(argv)
    overrides = [f"train.threads={args.threads}", "connector.token_positions=true", *args.overrides]
    cfg = load_config(args.config, overrides)
    model_fn = oracle_model_fn(args.arm)
    started = time.time()
    Trainer(cfg, args.out, progress=False, sample_fn=sample_grid, model_fn=model_fn).fit()
    train_s = time.time() - started
    model = load_model(args.out, model_fn=model_fn)
    ratios = evaluate_reconstruction(model, n=args.n, seed=0)
    write_report(args.result, "oracle_arms", argv, {"arm": args.arm, "overrides": overrides, "n": args.n,
                                                     "train_seconds": round(train_s, 1),
                                                        "ratios": {str(r): m for r, m in ratios.items()}})
    for ratio, m in ratios.items():
        print(f"ratio {ratio}: exact {m['exact']:.3f}  placement {m['placement']:.3f}  position {m['position']:.3f}  "
              f"mse own/other {m['mse_own']:.4f}/{m['mse_other']:.4f}")
    print(f"wrote {args.result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
