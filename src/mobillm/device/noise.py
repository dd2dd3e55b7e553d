"""The device's privacy noise: Gaussian noise on the rows it sends (against inversion) and
randomized response on the labels it trains with (label differential privacy).

The server knows the public backbone, so from hidden states it can recover input tokens
(``mobillm attack`` measures how well). ``add_frame_noise`` adds to each row ``x`` Gaussian noise
of standard deviation ``scale * rms(x)`` per coordinate, before the codec, so every row carries
the same signal-to-noise ratio whatever its layer's scale.

The noise is a function of ``(seed, step, tap)`` alone: a step resent after a reconnect (or by a
device restarted with ``mobillm train --resume``) sends the same bytes, which the project's
bit-exact resume depends on. The seed must stay on the device: a server that knew it could
regenerate the noise and subtract it. So a device draws it at random per session
(``draw_noise_seed``) unless told one, and keeps it beside its session for a resume.

Labels: in private-label mode the server still reads every label back from the gradients it
receives (``mobillm attack``: 100% on SST-2), and in the standard mode it receives them.
``randomized_labels`` applies randomized response (Warner 1965; as label differential privacy,
Ghazi et al., NeurIPS 2021) before any of that: each training label is kept with probability
``e^eps / (e^eps + K - 1)``, else replaced by one of the other ``K - 1`` classes at random,
once per text (the same noisy label in every epoch, cache replay, resume and session on this
device, so repeating a sample does not average its noise away: the draw is keyed by the
sample's token ids and a secret the device keeps, ``device_label_secret``). Whatever the
server computes from then on is a function of the noisy labels, so each label is
``eps``-differentially private against it, whatever it does. The flips are symmetric, so the
class that is most likely under the noisy labels is the one most likely under the true ones:
training needs no correction, only more samples.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import math
import os
import secrets

import torch

from mobillm.data.tokenization import TokenizedDataset


def draw_noise_seed() -> int:
    """A fresh secret seed, in [0, 2**63)."""
    return secrets.randbits(63)


def noise_generator(seed: int, step: int, tap: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, tap)`` through sha256, so neighbouring steps
    and taps get unrelated streams."""
    return _generator(f"mobillm-frame-noise:{seed}:{step}:{tap}")


def _generator(key: str) -> torch.Generator:
    digest = hashlib.sha256(key.encode()).digest()
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


def keep_probability(epsilon: float, classes: int) -> float:
    """The chance that randomized response at ``epsilon`` keeps a label of ``classes``."""
    return 1.0 / (1.0 + (classes - 1) * math.exp(-epsilon))


def device_label_secret() -> int:
    """This device's secret for randomizing labels: drawn once and kept in the cache folder
    (mode 0600), so the same text gets the same noisy label in every run and session here."""
    from mobillm.backbone.loader import cache_root

    path = cache_root() / "label-secret"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".label-secret.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, str(draw_noise_seed()).encode())
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # the first process to get here sets it
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return int(path.read_text())


def randomized_labels(
    data: TokenizedDataset, epsilon: float, classes: int, seed: int
) -> TokenizedDataset:
    """``data`` with each label kept with probability ``keep_probability(epsilon, classes)``,
    else replaced by another class uniformly. Deterministic in ``seed`` and each sample's
    token ids: a text seen twice (in one set, in training and validation, in another session
    with the same seed) gets the same noisy label, so repeating it reveals nothing more."""
    if data.labels is None:
        raise ValueError("randomized labels need a classification data set")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"label epsilon must be a finite number > 0, got {epsilon}")
    keep = keep_probability(epsilon, classes)
    labels = []
    for ids, y in zip(data.input_ids, data.labels, strict=True):
        text = hashlib.sha256(array.array("q", ids).tobytes()).hexdigest()
        gen = _generator(f"mobillm-label-rr:{seed}:{text}")
        u = torch.rand(2, generator=gen, dtype=torch.float64)
        if u[0] < keep:
            labels.append(y)
        else:  # one of the other classes, uniformly
            other = min(int(u[1] * (classes - 1)), classes - 2)
            labels.append(other + (other >= y))
    return dataclasses.replace(data, labels=labels)
