"""`IOMMConditioner`: the trained path between the frozen MLLM and the generator (adapter + connector) as a
diffusers `ModelMixin` / `ConfigMixin`, so that a pipeline directory saves and loads it like any component.

Its config holds the iomm config the model was trained with and the frozen MLLM's image preprocessing, which
is what `IOMMPipeline` needs to rebuild the conditioning around the saved MLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from iomm.conditioning.adapter import build_adapter
from iomm.conditioning.connector import build_connector
from iomm.config import Config
from iomm.config_checks import config_from_dict


class IOMMConditioner(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, iomm_config: dict[str, Any], mllm_hidden_size: int, mllm_embed_scale: float,
                 mllm_preprocessing: dict[str, Any]):
        super().__init__()
        cfg = config_from_dict(iomm_config, "conditioner/config.json: iomm_config", check_paths=False)
        self.adapter = build_adapter(cfg.adapter, mllm_hidden_size, mllm_embed_scale)
        self.connector = build_connector(cfg.connector, mllm_hidden_size)

    @property
    def iomm_config(self) -> Config:
        return config_from_dict(self.config.iomm_config, "conditioner/config.json: iomm_config", check_paths=False)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        weights = Path(save_directory) / SAFETENSORS_WEIGHTS_NAME
        if next(self.parameters(), None) is None and not weights.exists():
            # nothing trained here (a raw adapter, no connector): diffusers writes no weights file, then finds none
            save_file({}, str(weights), metadata={"format": "pt"})
