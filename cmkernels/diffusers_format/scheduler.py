"""The scheduler side: CMStochasticIterativeScheduler's settings (scheduler_config.json) as
SchedulerSettings, and the official time points `ts` <-> diffusers `timesteps`.

The scheduler settings of a checkpoint are the sampler's defaults (grid size, rho, sigmas,
clipping); `scheduler_settings_of` gives those that reproduce a denoiser's constants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cmkernels.diffusers_format.layout import (
    SCHEDULER_CLASS,
    SCHEDULER_CONFIG_NAME,
    WRITTEN_VERSION,
    DiffusersFormatError,
)
from cmkernels.diffusion import Denoiser
from cmkernels.noise_schedule import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN


@dataclass(frozen=True)
class SchedulerSettings:
    """CMStochasticIterativeScheduler's settings (scheduler_config.json), which are the
    sampler's defaults for a checkpoint. The defaults are the official ones."""

    num_train_timesteps: int = 40  # points of the Karras grid that ts / timesteps index (--steps)
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    sigma_data: float = SIGMA_DATA
    rho: float = RHO
    clip_denoised: bool = True  # clamp every consistency-function output to [-1, 1]
    s_noise: float = 1.0  # scale of the noise added between steps (cmkernels: 1 only)

    @classmethod
    def from_config(cls, config: dict, source: str = SCHEDULER_CONFIG_NAME) -> SchedulerSettings:
        name = config.get("_class_name", SCHEDULER_CLASS)
        if name != SCHEDULER_CLASS:
            raise DiffusersFormatError(
                f"{source} configures a {name}; consistency models sample with {SCHEDULER_CLASS}"
            )
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(
            k
            for k, v in config.items()
            if not k.startswith("_") and k not in fields and v is not None
        )
        if unknown:
            raise DiffusersFormatError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        try:
            values = {k: _cast(fields[k], v) for k, v in config.items() if k in fields}
            s = cls(**values)
        except (TypeError, ValueError) as e:
            raise DiffusersFormatError(f"{source}: {e}") from None
        if s.s_noise != 1.0:
            raise DiffusersFormatError(
                f"{source}: s_noise={s.s_noise} (cmkernels' multistep sampler adds unit noise "
                "between steps, as the official one: s_noise must be 1)"
            )
        if not 0 < s.sigma_min < s.sigma_max or s.num_train_timesteps < 2 or s.rho <= 0:
            raise DiffusersFormatError(
                f"{source}: needs 0 < sigma_min < sigma_max, num_train_timesteps >= 2, rho > 0"
            )
        return s

    def to_config(self) -> dict:
        return {
            "_class_name": SCHEDULER_CLASS,
            "_diffusers_version": WRITTEN_VERSION,
            **dataclasses.asdict(self),
        }


def _cast(kind: str, value):
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true/false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def scheduler_settings_of(denoiser: Denoiser, **overrides) -> SchedulerSettings:
    """The scheduler settings that reproduce `denoiser`'s sampling constants; overrides that are
    not None replace settings (num_train_timesteps=..., rho=..., clip_denoised=...)."""
    values = dict(sigma_min=float(denoiser.sigma_min), sigma_max=float(denoiser.sigma_max),
                  sigma_data=float(denoiser.sigma_data))  # fmt: skip
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SchedulerSettings(**values)


# ----------------------------------------------------------------------------------------------
# Time points: official ts <-> diffusers timesteps.


def ts_to_diffusers_timesteps(ts: list[int], steps: int) -> list[int]:
    """Official `--ts` (increasing indices into a Karras grid of `steps` points) -> the
    `timesteps` of ConsistencyModelPipeline with num_train_timesteps = steps: the evaluated
    points (all but the last, which only sets the noise of the final step) in decreasing
    order. ts = 0,22,39 with steps 40 -> [22, 0]. The last point must be steps - 1 (sigma_min):
    diffusers always ends there."""
    ts = [int(t) for t in ts]
    if len(ts) < 2 or ts[-1] != steps - 1 or any(a >= b for a, b in zip(ts, ts[1:])) or ts[0] < 0:
        raise ValueError(f"ts must increase from >= 0 and end at steps - 1 = {steps - 1}, got {ts}")
    return ts[-2::-1]


def diffusers_timesteps_to_ts(timesteps: list[int], steps: int) -> list[int]:
    """The inverse: pipeline `timesteps` (decreasing) -> official ts ending at steps - 1."""
    timesteps = [int(t) for t in timesteps]
    if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be decreasing, got {timesteps}")
    if timesteps[0] >= steps - 1 or timesteps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {steps - 2}], got {timesteps}")
    return timesteps[::-1] + [steps - 1]


def num_inference_steps_timesteps(k: int, steps: int) -> list[int]:
    """What ConsistencyModelPipeline(num_inference_steps=k) evaluates with num_train_timesteps =
    steps: indices 0, s, 2s, ... with s = steps // k, in decreasing order (k = 2, steps = 40:
    [20, 0], i.e. sigma 80 then 2.24)."""
    if not 1 <= k <= steps:
        raise ValueError(f"num_inference_steps must be in [1, {steps}], got {k}")
    return [i * (steps // k) for i in range(k)][::-1]
