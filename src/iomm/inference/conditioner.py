"""`IOMMConditioner`: the trained path between the frozen MLLM and the generator (adapter + connector) as a
diffusers `ModelMixin` / `ConfigMixin`, so that a pipeline directory saves and loads it like any component.

Its config holds the iomm config the model was trained with and the frozen MLLM's image preprocessing, which
is what `IOMMPipeline` needs to rebuild the conditioning around the saved MLLM.
"""

from __future__ import annotations

from typing import Any

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from iomm.conditioning.adapter import build_adapter
from iomm.conditioning.connector import Connector
from iomm.config import Config, config_from_dict


class IOMMConditioner(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, iomm_config: dict[str, Any], mllm_hidden_size: int, mllm_embed_scale: float,
                 mllm_preprocessing: dict[str, Any]):
        super().__init__()
        cfg = config_from_dict(iomm_config, "conditioner/config.json: iomm_config", check_paths=False)
        self.adapter = build_adapter(cfg.adapter, mllm_hidden_size, mllm_embed_scale)
        self.connector = Connector(cfg.connector, mllm_hidden_size)

    @property
    def iomm_config(self) -> Config:
        return config_from_dict(self.config.iomm_config, "conditioner/config.json: iomm_config", check_paths=False)
