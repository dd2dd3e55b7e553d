"""Batches: shapes, padding, classification loss positions, causal-LM targets, seeded order."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mobillm.data import (
    IGNORE_INDEX,
    Batch,
    ClassificationExample,
    DataConfig,
    LMExample,
    epoch_order,
    iter_batches,
    num_batches,
    tokenize_examples,
)

WORDS = ["the", "quick", "brown", "fox", "lazy", "dog", "movie", "good", "bad", "journey"]
TEXTS = [" ".join(WORDS[: 1 + (i * 3) % len(WORDS)]) for i in range(11)]


def test_classification_batches(tiny_tokenizer):
    cfg = DataConfig(template="Review: {text}\nSentiment:", batch_size=4, max_length=32)
    examples = [ClassificationExample(t, i % 2) for i, t in enumerate(TEXTS)]
    ds = tokenize_examples(examples, tiny_tokenizer, cfg)
    batches = list(iter_batches(ds, None, cfg, shuffle=False, seed=0))
    assert [len(b) for b in batches] == [4, 4, 3] and len(batches) == num_batches(11, 4)
    cue = tiny_tokenizer(":", add_special_tokens=False)["input_ids"][-1]
    for k, b in enumerate(batches):
        bsz, width = b.input_ids.shape
        assert b.input_ids.dtype == b.attention_mask.dtype == b.labels.dtype == torch.long
        assert b.labels.shape == b.loss_positions.shape == (bsz,)
        assert b.targets is None
        lengths = b.attention_mask.sum(1)
        assert width == int(lengths.max())  # dynamic padding to the longest row
        assert torch.equal(b.loss_positions, lengths - 1)
        assert b.num_tokens == int(lengths.sum())
        for r in range(bsz):
            n = int(lengths[r])
            assert b.attention_mask[r, :n].all() and not b.attention_mask[r, n:].any()
            assert (b.input_ids[r, n:] == ds.pad_id).all()
            assert b.input_ids[r, b.loss_positions[r]] == cue  # "Sentiment:" ends every row
            assert b.labels[r] == examples[4 * k + r].label


def check_targets(b: Batch, starts: list[int]) -> None:
    """targets[r, t] == input_ids[r, t+1] exactly where t+1 is a response token; else -100."""
    bsz, width = b.input_ids.shape
    assert b.targets.shape == (bsz, width) and b.labels is None
    for r in range(bsz):
        n = int(b.attention_mask[r].sum())
        for t in range(width):
            if max(starts[r], 1) <= t + 1 < n:
                assert b.targets[r, t] == b.input_ids[r, t + 1]
            else:
                assert b.targets[r, t] == IGNORE_INDEX


def test_causal_lm_targets_align(tiny_tokenizer):
    tok = tiny_tokenizer
    cfg = DataConfig(task="causal_lm", batch_size=3, max_length=24)
    examples = [LMExample("what is two plus two?", "four"), LMExample("", "the lazy dog")]
    examples += [LMExample("Q", " ".join(WORDS * 3))]
    ds = tokenize_examples(examples, tok, cfg)
    (b,) = iter_batches(ds, None, cfg, shuffle=False, seed=0)
    check_targets(b, ds.response_starts)
    # Row 0: the prompt never has a target and the last target is EOS.
    start = ds.response_starts[0]
    assert (b.targets[0, : start - 1] == IGNORE_INDEX).all()
    n0 = len(ds.input_ids[0])
    assert b.targets[0, n0 - 2] == tok.eos_token_id
    assert (b.targets[0, n0 - 1 :] == IGNORE_INDEX).all()
    # The loss positions predict exactly the response tokens.
    predicted = b.targets[0][b.targets[0] != IGNORE_INDEX].tolist()
    assert predicted == ds.input_ids[0][start:]


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["", *WORDS]), st.lists(st.sampled_from(WORDS), min_size=1)),
        min_size=1,
        max_size=6,
    ),
    max_length=st.integers(4, 16),
)
def test_causal_lm_targets_property(bos_tokenizer, rows, max_length):
    cfg = DataConfig(task="causal_lm", batch_size=6, max_length=max_length)
    examples = [LMExample(p, " ".join(r)) for p, r in rows]
    ds = tokenize_examples(examples, bos_tokenizer, cfg)
    for b in iter_batches(ds, None, cfg, shuffle=False, seed=0):
        assert b.input_ids.shape[1] <= max_length
        check_targets(b, ds.response_starts)
        assert (b.targets != IGNORE_INDEX).sum(1).min() >= 1


def test_iter_batches_tokenises_examples_itself(tiny_tokenizer):
    cfg = DataConfig(batch_size=5)
    examples = [ClassificationExample(t, 0) for t in TEXTS]
    a = list(iter_batches(examples, tiny_tokenizer, cfg, shuffle=True, seed=1))
    ds = tokenize_examples(examples, tiny_tokenizer, cfg)
    b = list(iter_batches(ds, None, cfg, shuffle=True, seed=1))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))


def test_seeded_shuffle_deterministic_and_differs_across_epochs():
    assert epoch_order(50, True, seed=3, epoch=1) == epoch_order(50, True, seed=3, epoch=1)
    assert epoch_order(50, True, seed=3, epoch=1) != epoch_order(50, True, seed=3, epoch=2)
    assert epoch_order(50, True, seed=3, epoch=1) != epoch_order(50, True, seed=4, epoch=1)
    assert sorted(epoch_order(50, True, seed=3)) == list(range(50))
    assert epoch_order(5, False, seed=3, epoch=7) == [0, 1, 2, 3, 4]


def test_shuffled_batches_cover_each_example_once(tiny_tokenizer):
    cfg = DataConfig(batch_size=4)
    examples = [ClassificationExample(t, i) for i, t in enumerate(TEXTS)]
    cfg = cfg.replace(labels=tuple(str(i) for i in range(len(TEXTS))))
    ds = tokenize_examples(examples, tiny_tokenizer, cfg)
    seen = [
        torch.cat([b.labels for b in iter_batches(ds, None, cfg, shuffle=True, seed=0, epoch=e)])
        for e in range(2)
    ]
    assert sorted(seen[0].tolist()) == list(range(len(TEXTS)))
    assert seen[0].tolist() != seen[1].tolist()


def test_num_batches():
    assert [num_batches(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_batch_to_device(tiny_tokenizer):
    cfg = DataConfig(task="causal_lm")
    (b,) = iter_batches([LMExample("a", "b")], tiny_tokenizer, cfg, shuffle=False, seed=0)
    moved = b.to("cpu")
    assert moved.labels is None and torch.equal(moved.targets, b.targets)


def test_epoch_batches_group_lengths_and_cover_every_example():
    import random

    from mobillm.data import epoch_batches

    rnd = random.Random(1)
    lengths = [rnd.randint(3, 60) for _ in range(1000)]
    grouped = epoch_batches(lengths, 16, seed=0, epoch=0, group=8)
    plain = epoch_batches(lengths, 16, seed=0, epoch=0, group=0)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert len(batches) == 63
    assert grouped == epoch_batches(lengths, 16, seed=0, epoch=0, group=8)
    assert grouped != epoch_batches(lengths, 16, seed=0, epoch=1, group=8)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.8 * padded(plain)
