"""`IOMMPipeline`: text-to-image, zero-shot editing and masked reconstruction, as a diffusers `DiffusionPipeline`.

Its components, one subfolder each in a pipeline directory (`iomm export`), each saved by its own library:

    generator      the diffusers model (SD3Transformer2DModel, ZImageTransformer2DModel, QwenImageTransformer2DModel
                   or UNet2DConditionModel)
    vae            AutoencoderKL or AutoencoderKLQwenImage (none for a pixel-space model)
    scheduler      FlowMatchEulerDiscreteScheduler
    mllm, tokenizer  the frozen MLLM (transformers)
    conditioner    IOMMConditioner: adapter + connector, and the iomm config

`IOMMPipeline.from_pretrained` reads such a directory through diffusers' loading (`dtype`, devices), or a
training run or checkpoint directory (its EMA weights unless `use_ema=False`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from PIL import Image
from torch import nn

from iomm.checkpointing.checkpoint import resolve_checkpoint
from iomm.checkpointing.weights import build_model, load_trainable
from iomm.conditioning.mllm import FrozenMLLM
from iomm.config import Config
from iomm.config_checks import load_config
from iomm.data.images import prepare_image
from iomm.generator.codec import PixelCodec, codec_for
from iomm.generator.flow import flow_scheduler
from iomm.generator.lora import load_lora
from iomm.image_tensors import to_pil
from iomm.inference.conditioner import IOMMConditioner
from iomm.inference.sampling import sample_images
from iomm.model import IOMM
from iomm.per_sample_rng import Generators
from iomm.registry import builtin_mllm, builtin_vae

PIPELINE_FILE = "model_index.json"
# The module of a saved pipeline directory that diffusers' generic loader imports the pipeline class from
# (`model_index.json` names it): `DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`.
LOADER_MODULE = "pipeline"
LOADER_SOURCE = ('"""IOMMPipeline for diffusers\' generic loader: the class is the installed iomm package\'s."""\n\n'
                 "from iomm.inference.pipeline import IOMMPipeline  # noqa: F401\n")
ImageInput = Image.Image | list[Image.Image]


def load_model(path: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu",
               model_fn: Callable[[Config], IOMM] = IOMM.from_config) -> IOMM:
    """A checkpoint dir, or a run dir (its newest intact checkpoint), with EMA weights by default; or a pipeline
    directory (`iomm export`), whose weights are the ones it was exported with."""
    if (Path(path) / PIPELINE_FILE).is_file() and model_fn is IOMM.from_config:
        return IOMMPipeline.from_pretrained(path).model.to(device).eval()
    checkpoint = resolve_checkpoint(path)
    cfg = load_config(checkpoint / "config.yaml")
    require_builtins(cfg, checkpoint)
    model = build_model(cfg, model_fn)
    load_trainable(model, checkpoint, use_ema=use_ema)
    return model.to(device).eval()


def require_builtins(cfg: Config, checkpoint: Path) -> None:
    """A trained model's built-in MLLM and VAE must be the ones it was trained with: their directories are named
    relative to the working directory, and a missing one would be built anew (another model) rather than loaded."""
    for section, builtin, directory in (("mllm", builtin_mllm(cfg.mllm.path), cfg.mllm.nano_dir),
                                        ("codec", builtin_vae(cfg.codec.path) if cfg.codec.kind == "vae" else None,
                                         cfg.codec.nano_dir)):
        if builtin is not None and not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(
                f"{checkpoint} was trained with the built-in {section} model of {Path(directory)} (its "
                f"{section}.nano_dir), which is not there from {Path.cwd()}: a new one would be built, and it would "
                "not be the model this run was trained with. Run from the directory the run was trained in.")


def assemble(generator: nn.Module, vae: nn.Module | None, mllm: nn.Module, tokenizer: Any,
             conditioner: IOMMConditioner, scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> IOMM:
    """The IOMM model around a pipeline's components (sharing them, not copying)."""
    cfg = conditioner.iomm_config
    frozen = FrozenMLLM(mllm, tokenizer, conditioner.config.mllm_preprocessing)
    frozen.prefix_cache = cfg.mllm.prefix_cache
    codec = PixelCodec() if vae is None else codec_for(vae, sample_posterior=cfg.codec.sample_posterior)
    model = IOMM(cfg, frozen, codec, generator, scheduler)
    model.adapter, model.connector, model.token_head = conditioner.adapter, conditioner.connector, None
    return model.eval()


class IOMMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "mllm->conditioner->generator->vae"
    _optional_components = ["vae"]

    def __init__(self, generator: nn.Module, scheduler: FlowMatchEulerDiscreteScheduler, mllm: nn.Module,
                 tokenizer: Any, conditioner: IOMMConditioner, vae: nn.Module | None = None):
        super().__init__()
        self.register_modules(generator=generator, vae=vae, scheduler=scheduler, mllm=mllm, tokenizer=tokenizer,
                              conditioner=conditioner)
        self.model = assemble(generator, vae, mllm, tokenizer, conditioner, scheduler)

    @property
    def cfg(self) -> Config:
        return self.model.cfg

    @classmethod
    def from_model(cls, model: IOMM) -> "IOMMPipeline":
        """A pipeline over a loaded model's own modules."""
        mllm = model.mllm
        conditioner = IOMMConditioner(model.cfg.to_dict(), mllm.hidden_size, mllm.embed_scale, mllm.preprocessing)
        conditioner.adapter, conditioner.connector = model.adapter, model.connector
        vae = getattr(model.codec, "vae", None)
        scheduler = model.scheduler if model.scheduler is not None else flow_scheduler()
        return cls(model.generator, scheduler, mllm.model, mllm.tokenizer, conditioner, vae)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, use_ema: bool = True, device: str | torch.device | None = None,
                        **kwargs: Any) -> "IOMMPipeline":
        """A pipeline directory (diffusers' loading; `kwargs` go to it), or a run / checkpoint directory."""
        if (Path(path) / PIPELINE_FILE).is_file():  # a local directory: never the Hub
            loader = Path(path) / f"{LOADER_MODULE}.py"
            # the loader iomm writes only imports this class: trusted; any other code (also a component's own
            # module, `COMPONENT/LIBRARY.py`, which diffusers would run under the same trust) needs the caller's
            own_loader = (loader.is_file() and loader.read_text(encoding="utf-8") == LOADER_SOURCE
                          and not any(Path(path).glob("*/*.py")))
            pipe = super().from_pretrained(path, **{"local_files_only": True, "trust_remote_code": own_loader,
                                                    **kwargs})
        else:
            pipe = cls.from_model(load_model(path, use_ema=use_ema))
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' layout, plus the module its generic loader imports this class from (`DiffusionPipeline`
        alone resolves a class name inside diffusers only)."""
        super().save_pretrained(save_directory, **kwargs)
        directory = Path(save_directory)
        (directory / f"{LOADER_MODULE}.py").write_text(LOADER_SOURCE, encoding="utf-8")
        index = json.loads((directory / PIPELINE_FILE).read_text(encoding="utf-8"))
        index["_class_name"] = [LOADER_MODULE, IOMMPipeline.__name__]
        (directory / PIPELINE_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def load_lora_weights(self, path: str | Path) -> None:
        """A LoRA in diffusers' format (`pytorch_lora_weights.safetensors` or its directory) into the generator."""
        load_lora(self.generator, self.cfg.generator.kind, Path(path))

    def _pixels(self, image: ImageInput) -> torch.Tensor:
        images = [image] if isinstance(image, Image.Image) else list(image)
        return torch.stack([prepare_image(i, self.cfg.data.resolution) for i in images]).to(self.device)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image: ImageInput | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: Generators = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Text-to-image (`prompt`), or zero-shot editing (`image` and the instruction as `prompt`).

        Initial noise comes from `generator` (one, or one per image), drawn on the CPU. `output_type`: "pil",
        "pt" (B, 3, H, W) in [0, 1], or "np" (B, H, W, 3).
        """
        if prompt is None:
            raise ValueError("give a prompt (text-to-image), or an image and an instruction as the prompt (editing)")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if image is None:
            cond = self.model.condition_texts(texts)
        else:
            pixels = self._pixels(image)
            texts = texts * len(pixels) if len(texts) == 1 else texts
            if len(texts) != len(pixels):
                raise ValueError(f"edit: {len(pixels)} images but {len(texts)} instructions")
            cond = self.model.condition_edit(pixels, texts)
        scale = self.cfg.flow.guidance_scale if guidance_scale is None else guidance_scale
        images = sample_images(self.model, cond, generator=generator, scheduler=self.scheduler,
                               steps=num_inference_steps or self.cfg.flow.sample_steps, guidance_scale=scale)
        output = _as_output(images.cpu(), output_type)
        return ImagePipelineOutput(images=output) if return_dict else (output,)

    @torch.no_grad()
    def reconstruct(self, image: Image.Image, mask_ratio: float, generator: torch.Generator | None = None,
                    num_inference_steps: int | None = None) -> tuple[Image.Image, Image.Image]:
        """Stage 1's own picture: the image with the masked patch tokens greyed out, and the image regenerated
        from that masked condition."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: expected a value in [0, 1), got {mask_ratio}")
        generator = generator or torch.Generator().manual_seed(0)
        pixels = self._pixels(image)
        cond = self.model.condition_masked_images(pixels, generator, ratio=mask_ratio)
        side = math.isqrt(cond.keep.shape[1])
        grid = cond.keep.float().view(1, 1, side, side)
        shown = nn.functional.interpolate(grid, size=pixels.shape[-2:], mode="nearest").to(pixels)
        masked = pixels * shown + 0.5 * (1 - shown)
        regenerated = sample_images(self.model, cond, generator=generator, scheduler=self.scheduler,
                                    steps=num_inference_steps or self.cfg.flow.sample_steps,
                                    guidance_scale=self.cfg.flow.reconstruct_guidance)
        return to_pil(masked.cpu())[0], to_pil(regenerated.cpu())[0]

    @torch.no_grad()
    def answer(self, image: Image.Image | None, question: str, max_new_tokens: int = 32) -> str:
        """The frozen MLLM's answer about an image (the understanding half of the UMM)."""
        pixels = None if image is None else self._pixels(image)
        return self.model.mllm.answer_batch(pixels, [question], max_new_tokens=max_new_tokens)[0]


def _as_output(images: torch.Tensor, output_type: str) -> list[Image.Image] | torch.Tensor | Any:
    if output_type == "pil":
        return to_pil(images)
    if output_type == "pt":
        return images
    if output_type == "np":
        return images.permute(0, 2, 3, 1).numpy()
    raise ValueError(f"output_type: expected 'pil', 'pt' or 'np', got {output_type!r}")


def generate_images(pipe: IOMMPipeline, prompts: list[str], images: list[Image.Image] | None = None, *,
                    seed: int = 0, batch_size: int = 64, **kwargs: Any) -> list[Image.Image]:
    """Many prompts (or edits) in chunks of `batch_size`, chunk i from a generator seeded `seed + i`, so the
    images do not depend on how many prompts come before a chunk."""
    out: list[Image.Image] = []
    for chunk, start in enumerate(range(0, len(prompts), batch_size)):
        refs = None if images is None else images[start:start + batch_size]
        generator = torch.Generator().manual_seed(seed + chunk)
        out += pipe(prompts[start:start + batch_size], image=refs, generator=generator, **kwargs).images
    return out
