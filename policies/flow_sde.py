"""Stochastic (SDE) denoising steps with the marginals of a flow-matching ODE, and their Gaussian log-probs.

Pure tensor functions shared by every flow policy (VoxCPM's LocDiT, the GLM-TTS flow). A flow is an affine path
between data x_data and Gaussian noise z,

    x_t = a(t) * x_data + b(t) * z,          v(x_t, t) = dx_t/dt  (the network's velocity),

integrated from the noise end to the data end by Euler steps of signed size dt (dt < 0 when noise sits at t = 1,
dt > 0 when noise sits at t = 0). `FlowTime` names the convention explicitly:

    FlowTime(data_at=0.0)                   VoxCPM / SD3 / Flow-GRPO: x_t = (1 - t) x_data + t z, noise at t = 1
    FlowTime(data_at=1.0, sigma_min=1e-6)   GLM-TTS / CosyVoice:      x_t = t x_data + (1 - (1 - sigma_min) t) z

From (x_t, v) the noise estimate, and hence the score of the marginal p_t, is closed form:
z_hat = (a' x - a v) / (a' b - a b'), score = -z_hat / b. The reverse-time SDE with the ODE's marginals is

    x_next = x + v dt + (g^2 / 2) score |dt| + g sqrt(|dt|) eps,   eps ~ N(0, I)

for any diffusion coefficient g(t) >= 0; g = 0 is exactly the Euler ODE step. Two choices of g are provided:
  - "flow_grpo" (Flow-GRPO, arXiv 2505.05470): g = eta * sqrt(n / (1 - n)), n = the noise fraction b(t)
    (n = t for VoxCPM), so the noise vanishes near data and grows near pure noise;
  - "constant" (DanceGRPO, arXiv 2505.07818): g = eta.

Log-prob reduction: the Gaussian log-density is SUMMED over all non-batch dims. The sum is the exact log-density
of the whole action (one patch transition), so exp(sum difference) is the true likelihood ratio and the closed-form
KL is the true KL. Flow-GRPO averages over dims instead, which divides every log-ratio by the number of dims D and
makes the PPO clip range act per dim; a caller that wants that scale divides these values by D.
All log-prob maths runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NOISE_SCHEDULES = ("flow_grpo", "constant")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class FlowTime:
    """The time convention of a flow: where data sits (t = 0 or t = 1) and the noise floor sigma_min."""

    data_at: float = 0.0
    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if self.data_at not in (0.0, 1.0):
            raise ValueError(f"FlowTime.data_at must be 0.0 or 1.0, got {self.data_at}")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"FlowTime.sigma_min must be in [0, 1), got {self.sigma_min}")

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(a(t), b(t), a', b') of x_t = a x_data + b z; a' and b' are constants for these affine paths."""
        s = self.sigma_min
        if self.data_at == 1.0:
            return t, 1.0 - (1.0 - s) * t, 1.0, -(1.0 - s)
        return 1.0 - t, s + (1.0 - s) * t, -1.0, 1.0 - s

    def noise_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """n(t) in [0, 1]: 1 at pure noise, 0 at data (t for VoxCPM, 1 - t for GLM-TTS)."""
        return t if self.data_at == 0.0 else 1.0 - t


def _bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a [N] tensor -> [N, 1, ...] float32 broadcastable against `like` ([N, ...])."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def diffusion_coefficient(
    t: torch.Tensor | float, eta: float, time: FlowTime, schedule: str = "flow_grpo", max_noise: float = 0.999
) -> torch.Tensor:
    """g(t) of the SDE. t: scalar or [N]; returns the same shape (float32).

    "flow_grpo": eta * sqrt(n / (1 - n)) with n clamped to `max_noise` (the step that starts at pure noise would
    otherwise have g = inf); "constant": eta.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    if schedule == "constant":
        return torch.full_like(t, float(eta))
    if schedule != "flow_grpo":
        raise ValueError(f"noise schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}")
    n = time.noise_fraction(t).clamp(0.0, max_noise)
    return float(eta) * torch.sqrt(n / (1.0 - n))


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, time: FlowTime) -> torch.Tensor:
    """Score of the marginal p_t at x implied by the velocity. x, v: [N, ...]; t: scalar or [N]. float32 out."""
    tt = _bcast(t, x)
    a, b, da, db = time.coefficients(tt)
    x32, v32 = x.float(), v.float()
    z_hat = (da * x32 - a * v32) / (da * b - a * db)
    return -z_hat / b


def sde_step_mean_std(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    dt: torch.Tensor | float,
    g: torch.Tensor | float,
    time: FlowTime,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Gaussian transition x_t -> x_{t+dt}.

    x, v: [N, ...] state and velocity at time t; t, dt, g: scalar or [N] (dt signed: t_next - t).
    Returns mean [N, ...] (float32) and std [N, 1, ...] (float32, broadcastable). With g == 0 the mean is the
    Euler ODE step x + v * dt computed in float32.
    """
    x32, v32 = x.float(), v.float()
    dtt = _bcast(dt, x32)
    gg = _bcast(g, x32)
    mean = x32 + v32 * dtt
    if bool(torch.any(gg != 0)):
        mean = mean + 0.5 * gg * gg * score_from_velocity(x32, v32, t, time) * dtt.abs()
    std = gg * dtt.abs().sqrt()
    if std.ndim == 0:
        std = std.expand(x.shape[0]).reshape(x.shape[0], *([1] * (x.ndim - 1)))
    return mean, std


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    dt: torch.Tensor | float,
    g: torch.Tensor | float,
    time: FlowTime,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SDE step: returns (x_next [N, ...] float32, mean [N, ...], std [N, 1, ...]).

    noise: [N, ...] standard normal draws (None: the mean, i.e. no injected noise).
    """
    mean, std = sde_step_mean_std(x, v, t, dt, g, time)
    x_next = mean if noise is None else mean + std * noise.float()
    return x_next, mean, std


def gaussian_logprob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_next; mean, std^2 I) summed over all non-batch dims. x_next, mean: [N, ...]; std: broadcastable.

    Returns [N] float32. std must be > 0 (ODE steps carry no log-prob).
    """
    x32, m32 = x_next.float(), mean.float()
    s32 = torch.as_tensor(std, dtype=torch.float32, device=x32.device).expand_as(x32)
    lp = -((x32 - m32) ** 2) / (2.0 * s32 * s32) - torch.log(s32) - _LOG_SQRT_2PI
    return lp.flatten(1).sum(dim=1)


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, s^2 I) || N(mean_q, s^2 I)) = ||mean_p - mean_q||^2 / (2 s^2), summed over non-batch dims.

    mean_p, mean_q: [N, ...]; std: broadcastable, > 0. Returns [N] float32.
    """
    d = mean_p.float() - mean_q.float()
    s32 = torch.as_tensor(std, dtype=torch.float32, device=d.device).expand_as(d)
    return (d * d / (2.0 * s32 * s32)).flatten(1).sum(dim=1)
