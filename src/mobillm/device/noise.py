"""Calibrated Gaussian noise on the rows a device sends: a mitigation against inversion.

The server knows the public backbone, so from hidden states it can recover input tokens
(``mobillm attack`` measures how well). ``add_frame_noise`` adds to each row ``x`` Gaussian noise
of standard deviation ``scale * rms(x)`` per coordinate, before the codec, so every row carries
the same signal-to-noise ratio whatever its layer's scale.

The noise is a function of ``(seed, step, tap)`` alone: a step resent after a reconnect (or by a
device restarted with ``mobillm train --resume``) sends the same bytes, which the project's
bit-exact resume depends on. The seed must stay on the device: a server that knew it could
regenerate the noise and subtract it. So a device draws it at random per session
(``draw_noise_seed``) unless told one, and keeps it beside its session for a resume.
"""

from __future__ import annotations

import hashlib
import secrets

import torch


def draw_noise_seed() -> int:
    """A fresh secret seed, in [0, 2**63)."""
    return secrets.randbits(63)


def noise_generator(seed: int, step: int, tap: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, tap)`` through sha256, so neighbouring steps
    and taps get unrelated streams."""
    digest = hashlib.sha256(f"mobillm-frame-noise:{seed}:{step}:{tap}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return gen


def add_frame_noise(
    rows: torch.Tensor, scale: float, seed: int, step: int, tap: int
) -> torch.Tensor:
    """``rows`` (rows, hidden) float -> ``rows + scale * rms(row) * N(0, 1)``, float32.

    ``scale`` is the noise's standard deviation relative to each row's root mean square
    (0 returns ``rows`` unchanged). Deterministic in ``(seed, step, tap)`` on any machine.
    """
    if scale < 0:
        raise ValueError(f"frame noise scale must be >= 0, got {scale}")
    x = rows.float()
    if scale == 0 or x.numel() == 0:
        return x
    z = torch.randn(x.shape, generator=noise_generator(seed, step, tap), dtype=torch.float32)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    return x + (scale * rms) * z.to(x.device)
