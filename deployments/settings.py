"""Where prepared models and data live, and the resource profile: the settings every
model server shares. Each server reads its own settings beside it
(`deployments/<server>/settings.py`, or a field of its builder's arguments).

Every field can be set from the environment with the ``SERVEGRAPH_`` prefix, e.g.
``SERVEGRAPH_HOME=/data/servegraph`` or ``SERVEGRAPH_PROFILE=gpu``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def package_dir(name: str) -> Path:
    """The folder of an installed package, without importing it (some won't import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


class ModelSettings(BaseSettings):
    """The model servers' shared settings."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_", extra="ignore")

    home: Path = Field(REPO_ROOT / "var", description="Prepared models and index data.")
    profile: Literal["cpu", "gpu"] = Field(
        "cpu", description="Resource profile: CPUs only, or GPU fractions per deployment."
    )

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
