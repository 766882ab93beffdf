"""Samplers in numpy, built from a diffusers ``scheduler_config.json``: what an app runs instead of diffusers.

Each reproduces its diffusers class (0.42) step for step — same timesteps, same sigmas, same update — so that the
torch-free loop and the PyTorch pipeline draw the same image from the same initial latents (``verify BUNDLE``
measures it):

* ``ddim``  — ``DDIMScheduler`` (η = 0): ``clip_sample``, ``set_alpha_to_one``;
* ``euler`` — ``EulerDiscreteScheduler`` (no churn, linear sigma interpolation, final sigma 0);
* ``dpm++`` — ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, order ≤ 2, midpoint solver
  (DPM-Solver++ 2M), final sigma 0 — the toy teacher's sampler.

All take ``prediction_type`` ``epsilon``, ``v_prediction`` or ``sample`` and the ``timestep_spacing`` modes
``leading``, ``linspace``, ``trailing``. Keys missing from a config take the diffusers class's default (so
``DDIMScheduler.from_config(c)`` and ``make_scheduler("ddim", c)`` agree on any config ``c``). Latents are float32
arrays ``[batch, C, h, w]``; timesteps are what the U-Net's ``timestep`` input receives (float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import LaptopDeployError

SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {**_COMMON, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True},
    "euler": {**_COMMON, "timestep_spacing": "linspace", "final_sigmas_type": "zero"},
    "dpm++": {**_COMMON, "timestep_spacing": "linspace", "solver_order": 2, "lower_order_final": True,
              "final_sigmas_type": "zero", "euler_at_final": False},
}
# options whose other values these numpy ports do not implement: refused rather than silently ignored
_UNSUPPORTED = {"thresholding": (False,), "use_karras_sigmas": (False, None), "use_exponential_sigmas": (False, None),
                "use_beta_sigmas": (False, None), "use_flow_sigmas": (False, None), "rescale_betas_zero_snr": (False,),
                "use_lu_lambdas": (False, None), "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint",),
                "interpolation_type": ("linear",), "timestep_type": ("discrete",), "trained_betas": (None,),
                "variance_type": (None,), "final_sigmas_type": ("zero",)}


class SchedulerError(LaptopDeployError):
    """An unknown scheduler name, or a config option these numpy samplers do not implement."""


def scheduler_name(config: dict[str, Any]) -> str:
    """Our name (``ddim``/``euler``/``dpm++``) of a config's diffusers ``_class_name``."""
    cls = config.get("_class_name")
    for name, class_name in SCHEDULERS.items():
        if class_name == cls:
            return name
    raise SchedulerError(f"the bundle's scheduler {cls!r} has no numpy port; pass --scheduler "
                         f"{'|'.join(SCHEDULERS)}")


def make_scheduler(name: str | None, config: dict[str, Any]) -> Scheduler:
    """The sampler ``name`` (default: the config's own class) with ``config``'s settings over its defaults."""
    name = name or scheduler_name(config)
    if name not in SCHEDULERS:
        raise SchedulerError(f"unknown scheduler '{name}'; valid: {', '.join(SCHEDULERS)}")
    settings = {**DEFAULTS[name], **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, allowed in _UNSUPPORTED.items():
        if key in settings and settings[key] not in allowed and not (name != "dpm++" and key in (
                "algorithm_type", "solver_type", "final_sigmas_type")):
            raise SchedulerError(f"scheduler option {key}={settings[key]!r} is not implemented by the numpy "
                                 f"'{name}' sampler (supported: {allowed[0]!r})")
    if settings["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise SchedulerError(f"prediction_type {settings['prediction_type']!r}; valid: epsilon, v_prediction, sample")
    return {"ddim": DDIM, "euler": Euler, "dpm++": DPMSolverPP2M}[name](settings)


def alphas_cumprod(settings: dict[str, Any]) -> np.ndarray:
    """ᾱ_t for t in [0, N), float32, from ``beta_schedule`` ``linear`` or ``scaled_linear`` (diffusers' float32)."""
    n, start, end = settings["num_train_timesteps"], settings["beta_start"], settings["beta_end"]
    if settings["beta_schedule"] == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    elif settings["beta_schedule"] == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2
    else:
        raise SchedulerError(f"beta_schedule {settings['beta_schedule']!r}; valid: linear, scaled_linear")
    return np.cumprod(1.0 - betas, dtype=np.float32)


def spaced_timesteps(settings: dict[str, Any], steps: int, *, plus_one: bool = False,
                     round_linspace: bool = True) -> np.ndarray:
    """Descending training timesteps (float64) for ``steps`` steps per ``timestep_spacing``; ``plus_one`` spaces
    ``steps + 1`` points and drops the last, as DPM-Solver does for ``linspace`` and ``leading``; Euler keeps
    fractional ``linspace`` timesteps (``round_linspace=False``)."""
    n, spacing, count = settings["num_train_timesteps"], settings["timestep_spacing"], steps + int(plus_one)
    if spacing == "linspace":
        values = np.linspace(0, n - 1, count)[::-1]
        values = values.round() if round_linspace else values
    elif spacing == "leading":
        values = (np.arange(0, count) * (n // count)).round()[::-1] + settings["steps_offset"]
    elif spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)) - 1
    else:
        raise SchedulerError(f"timestep_spacing {spacing!r}; valid: leading, linspace, trailing")
    return values[:-1] if plus_one else values


class Scheduler:
    """``set_timesteps(steps)``, then per step: ``scale_model_input(x, i)``, U-Net at ``timesteps[i]``,
    ``step(model_output, i, x) -> x``. ``init_noise_sigma`` scales the N(0, 1) initial latents."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.alphas_cumprod = alphas_cumprod(settings)
        self.timesteps = np.zeros(0, dtype=np.float32)
        self.init_noise_sigma = 1.0

    def set_timesteps(self, steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _x0_eps(self, output: np.ndarray, sample: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
        """The predicted clean latent from ``output`` at x_t = alpha·x0 + sigma·ε."""
        kind = self.settings["prediction_type"]
        if kind == "epsilon":
            return (sample - sigma * output) / alpha
        if kind == "v_prediction":
            return alpha * sample - sigma * output
        return output


class DDIM(Scheduler):
    def set_timesteps(self, steps: int) -> None:
        self.timesteps = spaced_timesteps(self.settings, steps).astype(np.int64).astype(np.float32)
        self.step_ratio = self.settings["num_train_timesteps"] // steps

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        t = int(self.timesteps[index])
        prev = t - self.step_ratio
        alpha_t = float(self.alphas_cumprod[t])
        final = 1.0 if self.settings["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        alpha_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else final
        a, s = alpha_t ** 0.5, (1 - alpha_t) ** 0.5
        x0 = self._x0_eps(model_output, sample, a, s)
        eps = {"epsilon": model_output, "v_prediction": a * model_output + s * sample}.get(
            self.settings["prediction_type"], (sample - a * x0) / s)  # before clipping x0, as diffusers
        if self.settings["clip_sample"]:
            limit = self.settings["clip_sample_range"]
            x0 = np.clip(x0, -limit, limit)
        return (alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps).astype(np.float32)


def _sigmas(settings: dict[str, Any], alphas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """σ(t) = sqrt((1 − ᾱ)/ᾱ) interpolated at ``timesteps``, then a final 0, float32."""
    table = ((1 - alphas) / alphas) ** 0.5
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


class Euler(Scheduler):
    def set_timesteps(self, steps: int) -> None:
        timesteps = spaced_timesteps(self.settings, steps, round_linspace=False).astype(np.float32)
        self.timesteps = timesteps
        self.sigmas = _sigmas(self.settings, self.alphas_cumprod, timesteps)
        top = float(self.sigmas.max())
        self.init_noise_sigma = top if self.settings["timestep_spacing"] in ("linspace", "trailing") \
            else (top ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return (sample / ((float(self.sigmas[index]) ** 2 + 1) ** 0.5)).astype(np.float32)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        sigma = float(self.sigmas[index])
        kind = self.settings["prediction_type"]
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        else:
            x0 = model_output
        derivative = (sample - x0) / sigma
        return (sample + derivative * (float(self.sigmas[index + 1]) - sigma)).astype(np.float32)


class DPMSolverPP2M(Scheduler):
    """DPM-Solver++ (2M, midpoint): first order at the first step and (lower_order_final) the last ones."""

    def set_timesteps(self, steps: int) -> None:
        if self.settings["timestep_spacing"] == "trailing":
            timesteps = spaced_timesteps(self.settings, steps)
        else:
            timesteps = spaced_timesteps(self.settings, steps, plus_one=True)
        timesteps = timesteps.copy().astype(np.int64)
        self.timesteps = timesteps.astype(np.float32)
        self.sigmas = _sigmas(self.settings, self.alphas_cumprod, timesteps.astype(np.float64))
        self.outputs: list[np.ndarray] = []
        self.lower_order_nums = 0

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        alpha = 1.0 / (sigma ** 2 + 1) ** 0.5
        return alpha, sigma * alpha

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        count, order = len(self.timesteps), self.settings["solver_order"]
        final = index == count - 1 and (self.settings["euler_at_final"] or (
            self.settings["lower_order_final"] and count < 15) or self.settings["final_sigmas_type"] == "zero")
        second_last = index == count - 2 and self.settings["lower_order_final"] and count < 15
        alpha_s, sigma_s = self._alpha_sigma(float(self.sigmas[index]))
        x0 = self._x0_eps(model_output, sample, alpha_s, sigma_s).astype(np.float32)
        self.outputs = [*self.outputs[-(order - 1):], x0] if order > 1 else [x0]
        alpha_t, sigma_t = self._alpha_sigma(float(self.sigmas[index + 1]))
        with np.errstate(divide="ignore"):  # σ = 0 at the end: λ = +inf, exp(−h) = 0, exactly as in diffusers
            lam_t, lam_s = np.log(alpha_t) - np.log(sigma_t), np.log(alpha_s) - np.log(sigma_s)
        h = lam_t - lam_s
        decay = np.expm1(-h) if np.isfinite(h) else -1.0
        if order == 1 or self.lower_order_nums < 1 or final:
            out = (sigma_t / sigma_s) * sample - alpha_t * decay * x0
        else:
            alpha_1, sigma_1 = self._alpha_sigma(float(self.sigmas[index - 1]))
            lam_1 = np.log(alpha_1) - np.log(sigma_1)
            r0 = (lam_s - lam_1) / h
            d0, d1 = self.outputs[-1], (1.0 / r0) * (self.outputs[-1] - self.outputs[-2])
            out = (sigma_t / sigma_s) * sample - alpha_t * decay * d0 - 0.5 * alpha_t * decay * d1
        del second_last  # order 2 takes a second-order step there anyway; kept for the order-3 rule's symmetry
        self.lower_order_nums = min(self.lower_order_nums + 1, order)
        return np.asarray(out, dtype=np.float32)
