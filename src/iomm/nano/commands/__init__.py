"""The testbed's commands: `iomm world`, `mllm`, `vae`, `recipe`, and `iomm eval shapes`, `edits`, `reconstruct`
(registered through the `iomm.commands` and `iomm.eval_commands` entry-point groups in pyproject.toml)."""
