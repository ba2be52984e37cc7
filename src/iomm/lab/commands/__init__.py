"""The lab's commands: `iomm study` and `iomm bench` (registered through the `iomm.commands` entry-point group in
pyproject.toml)."""
