"""The price and power tables that turn resource-seconds into money and energy."""

from __future__ import annotations

import functools

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Prices(BaseSettings):
    """Price and power tables, from the environment (``SERVEGRAPH_COST_``).

    Prices: AWS us-west-2 on-demand, Linux, for `cluster.yaml`'s instance types, split
    per resource: an m6i.2xlarge ($0.384/h, 8 vCPU, 32 GiB) split in the ratio of Google
    Cloud's published N2 prices per vCPU-hour and per GiB-hour ($0.031611 : $0.004237)
    gives $0.03125 per vCPU-hour and $0.00419 per GiB-hour; a g5.2xlarge ($1.212/h) less
    the same 8 vCPUs and 32 GiB gives $0.828 per A10G GPU-hour.

    Power: Cloud Carbon Footprint's coefficients for AWS (cloudcarbonfootprint.org,
    methodology): a vCPU at 3.5 W (its maximum; the minimum, idle, is 0.74 W: a request
    being served keeps its CPUs busy), memory 0.392 W per GiB; an A10G at its 150 W
    board power; times a data-centre PUE of 1.135 (AWS's, as CCF uses).
    """

    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_COST_", extra="ignore")

    usd_per_cpu_hour: float = Field(0.03125, description="Per vCPU-hour.")
    usd_per_gpu_hour: float = Field(0.828, description="Per GPU-hour (A10G by default).")
    usd_per_gib_hour: float = Field(0.00419, description="Per GiB-hour of memory.")
    watts_per_cpu: float = Field(3.5, description="Per vCPU at load.")
    watts_per_gpu: float = Field(150.0, description="Per GPU at load (A10G board power).")
    watts_per_gib: float = Field(0.392, description="Per GiB of memory.")
    pue: float = Field(1.135, description="Data-centre power usage effectiveness.")

    def usd(self, charge: dict[str, float]) -> float:
        return (
            charge.get("cpu_s", 0.0) * self.usd_per_cpu_hour
            + charge.get("gpu_s", 0.0) * self.usd_per_gpu_hour
            + charge.get("gib_s", 0.0) * self.usd_per_gib_hour
        ) / 3600

    def joules(self, charge: dict[str, float]) -> float:
        watts_s = (
            charge.get("cpu_s", 0.0) * self.watts_per_cpu
            + charge.get("gpu_s", 0.0) * self.watts_per_gpu
            + charge.get("gib_s", 0.0) * self.watts_per_gib
        )
        return watts_s * self.pue


@functools.cache
def prices() -> Prices:
    """The tables, read from the environment once per process: pricing runs on every
    request, and a settings object re-reads the environment each time it is made."""
    return Prices()
