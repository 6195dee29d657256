"""What a model was made with, for its manifest: software versions, the code's commit, the device."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

_PACKAGES = {"shelfsight": "shelfsight", "torch": "torch", "torchvision": "torchvision",
             "open_clip": "open_clip_torch", "timm": "timm"}
COMMIT_ENV = "SHELFSIGHT_COMMIT"  # set at image build time, where there is no .git


def code_commit() -> str:
    """The code's git commit: $SHELFSIGHT_COMMIT, else `git rev-parse` of this checkout (with '-dirty'
    when it has uncommitted changes), else 'unknown'."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    here = Path(__file__).resolve().parent
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        commit = subprocess.run([git, "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,  # noqa: S603
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"], cwd=here,  # noqa: S603
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def software_versions() -> dict[str, str]:
    """Versions of shelfsight and the libraries that decide a model's numbers, plus python and the commit."""
    out = {"python": platform.python_version(), "commit": code_commit()}
    for name, distribution in _PACKAGES.items():
        try:
            out[name] = version(distribution)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def describe_device(device: torch.device) -> str:
    """'cpu', or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def training_precision(device: torch.device) -> str:
    """How `fit` computes: bf16 autocast on CUDA (fp32 weights and logits), fp32 elsewhere."""
    return "bf16-autocast, fp32 weights and logits" if device.type == "cuda" else "fp32"
