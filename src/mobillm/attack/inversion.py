"""Recovering input tokens from decoded frames: nearest embedding, a learned inverter, a
bag-of-words probe. Each takes the attacker's public frames (to fit on) and scores held-out ones.

All three compare against the backbone's input-embedding matrix ``emb`` (vocab, hidden), which
is public. The learned models are tied to it: they map a row into the embedding space and score
tokens by cosine similarity there, so a token that never occurred in the public text can still
be recovered (an untied softmax over the public vocabulary could not name it).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 2048  # rows scored against the whole vocabulary at once (memory: CHUNK x vocab floats)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How the learned attacks train: Adam, ``epochs`` passes in minibatches of ``batch``."""

    epochs: int = 6
    batch: int = 256
    lr: float = 5e-3
    weight_decay: float = 0.0
    seed: int = 0


def nearest_embedding(rows: torch.Tensor, emb: torch.Tensor, center: torch.Tensor | None = None):
    """``rows`` (rows, hidden) -> (rows,) ids of the input-embedding row of highest cosine.

    ``center`` (hidden,): subtracted first (the public mean row of the layer: deep rows share a
    large common component that swamps the cosine otherwise).
    """
    x = rows if center is None else rows - center
    return _argmax_cosine(F.normalize(x.float(), dim=-1), F.normalize(emb.float(), dim=-1))


def _argmax_cosine(z: torch.Tensor, emb_n: torch.Tensor) -> torch.Tensor:
    out = [(z[i : i + CHUNK] @ emb_n.T).argmax(1) for i in range(0, z.shape[0], CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class _Standardize(nn.Module):
    """Per-coordinate z-score with the public rows' statistics (fixed, not trained)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0) + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _mapper(x: torch.Tensor, out: int, kind: str) -> nn.Module:
    """Standardize, then a linear map (``kind="linear"``) or a one-hidden-layer MLP."""
    d = x.shape[1]
    if kind == "linear":
        body: nn.Module = nn.Linear(d, out)
    elif kind == "mlp":
        body = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, out))
    else:
        raise ValueError(f"inverter kind must be 'linear' or 'mlp', got {kind!r}")
    return nn.Sequential(_Standardize(x), body)


class TokenInverter(nn.Module):
    """Row -> token id: ``argmax_v cos(map(row), emb[v])`` over the whole vocabulary.

    Trained with cross-entropy over the tokens of the public text only (``tau * cos`` logits),
    which keeps training cheap; prediction ranges over every token.
    """

    def __init__(self, x: torch.Tensor, emb: torch.Tensor, kind: str) -> None:
        super().__init__()
        self.map = _mapper(x, emb.shape[1], kind)
        self.log_tau = nn.Parameter(torch.tensor(3.0))  # tau = e^3 = 20 at the start
        self.register_buffer("emb_n", F.normalize(emb.float(), dim=-1))

    def forward(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.map(x), dim=-1)
        return self.log_tau.exp() * z @ self.emb_n[cand].T

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return _argmax_cosine(F.normalize(self.map(x.float()), dim=-1), self.emb_n)


def fit_token_inverter(
    x: torch.Tensor, ids: torch.Tensor, emb: torch.Tensor, kind: str, opt: FitOptions
) -> TokenInverter:
    """Fit a ``TokenInverter`` on public rows ``x`` (rows, hidden) and their token ``ids``."""
    gen = torch.Generator().manual_seed(opt.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opt.seed)
        model = TokenInverter(x, emb, kind)
    cand, target = torch.unique(ids, return_inverse=True)
    _train(model, x, lambda m, b: F.cross_entropy(m(x[b], cand), target[b]), len(x), opt, gen)
    return model


class BagProbe(nn.Module):
    """Loss row -> per-token log-odds that the token occurs in the sample's text.

    A multi-label linear probe: ``tau * cos(map(row), emb[v]) + bias[v]`` for the public
    vocabulary ``vocab`` (tokens outside it are never predicted).
    """

    def __init__(self, x: torch.Tensor, emb: torch.Tensor, vocab: torch.Tensor, kind: str):
        super().__init__()
        self.map = _mapper(x, emb.shape[1], kind)
        self.log_tau = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.full((len(vocab),), -4.0))
        self.register_buffer("vocab", vocab)
        self.register_buffer("emb_n", F.normalize(emb.float()[vocab], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.map(x), dim=-1)
        return self.log_tau.exp() * z @ self.emb_n.T + self.bias


def bag_targets(bags: list[set[int]], vocab: torch.Tensor) -> torch.Tensor:
    """(samples, len(vocab)) 0/1 floats: which of ``vocab`` each sample's bag holds."""
    pos = {int(t): j for j, t in enumerate(vocab.tolist())}
    y = torch.zeros(len(bags), len(vocab))
    for i, bag in enumerate(bags):
        for t in bag:
            if t in pos:
                y[i, pos[t]] = 1.0
    return y


def fit_bag_probe(
    x: torch.Tensor, bags: list[set[int]], emb: torch.Tensor, kind: str, opt: FitOptions
) -> BagProbe:
    """Fit a ``BagProbe`` on public loss rows ``x`` (samples, hidden) and their token bags."""
    vocab = torch.tensor(sorted(set().union(*bags)) or [0], dtype=torch.long)
    y = bag_targets(bags, vocab)
    gen = torch.Generator().manual_seed(opt.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opt.seed)
        model = BagProbe(x, emb, vocab, kind)
    _train(
        model, x, lambda m, b: F.binary_cross_entropy_with_logits(m(x[b]), y[b]), len(x), opt, gen
    )
    return model


def _train(model: nn.Module, x: torch.Tensor, loss_fn, n: int, opt: FitOptions, gen) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    adam = torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
    model.train()
    for _ in range(opt.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, opt.batch):
            loss = loss_fn(model, perm[i : i + opt.batch])
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()
    model.eval()


@torch.no_grad()
def bag_scores(
    probe: BagProbe,
    x: torch.Tensor,
    bags: list[set[int]],
    threshold: float,
    drop: set[int] | frozenset[int] = frozenset(),
) -> dict[str, float]:
    """Micro precision and recall of ``probe`` on held-out loss rows ``x`` against ``bags``.

    Two decision rules: every token of probability >= ``threshold``; and the top k tokens with
    k = the sample's true bag size (an attacker told the length: an upper bound on this probe).
    Recall counts every private token, also those outside the public vocabulary. Tokens in
    ``drop`` are neither claimed nor counted (to score the rarer, more telling tokens alone).
    """
    prob = torch.sigmoid(probe(x.float()))
    if drop:
        prob[:, torch.isin(probe.vocab, torch.tensor(sorted(drop)))] = 0.0
        bags = [b - drop for b in bags]
    y = bag_targets(bags, probe.vocab)
    sizes = torch.tensor([len(b) for b in bags], dtype=torch.float)
    total = float(sizes.sum())
    pred = prob >= threshold
    tp = float((pred & (y > 0)).sum())
    ranks = prob.argsort(1, descending=True).argsort(1)
    top = ranks < sizes.unsqueeze(1)
    tp_k = float((top & (y > 0)).sum())
    return {
        "precision": tp / max(1.0, float(pred.sum())),
        "recall": tp / max(1.0, total),
        "predicted_per_sample": float(pred.sum()) / max(1, len(bags)),
        "topk_recall": tp_k / max(1.0, total),
    }
