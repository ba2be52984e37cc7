"""iomm: image-only pre-training for the visual-generation half of unified multimodal models (IOMM)."""

import os

# A torchrun launch says each message once, on rank 0. torch's C++ warnings (DDP's reducer warns from the
# autograd thread, out of reach of Python's filters) are the same on every rank, so the other ranks keep only
# C++ errors. The level is read when torch loads, hence here, before anything imports it; a user's own setting
# wins.
if os.environ.get("RANK", "0") != "0":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
