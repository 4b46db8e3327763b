"""The language-model evaluation's token metrics against transformers' own loss, padded."""

from __future__ import annotations

import math

import pytest
import torch

from mergecli.data import TensorData
from mergecli.evaluate.language_model import predicted_tokens, token_metrics

transformers = pytest.importorskip("transformers")


def test_token_metrics_are_transformers_loss_over_real_tokens() -> None:
    from fixtures.tiny_llama import build

    torch.manual_seed(0)
    model = build(vocab_size=50).eval()
    ids = torch.randint(0, 50, (5, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[4, 3:] = 0
    data = TensorData(ids, torch.zeros(5, dtype=torch.int64), mask=mask)
    # batches of 2: the mean is over every predicted token of the set, not a mean of batches
    measured = token_metrics(model, data, 2, torch.device("cpu"))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert measured["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert measured["perplexity"] == pytest.approx(math.exp(measured["loss"]), rel=1e-12)
    assert predicted_tokens(data) == 5 * 11 - 4 - 9
    assert predicted_tokens(TensorData(ids, torch.zeros(5, dtype=torch.int64))) == 5 * 11


def test_ensemble_is_the_log_of_the_mean_of_the_members_probabilities() -> None:
    from fixtures.tiny_llama import build
    from mergecli.evaluate.language_model import (
        ensemble_log_probs,
        target_log_probs,
        token_metrics_of,
    )

    torch.manual_seed(1)
    # Far from uniform (large initial weights), so that the members disagree.
    members = [build(vocab_size=50, initializer_range=0.5).eval() for _ in range(2)]
    ids = torch.randint(0, 50, (4, 10))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    data = TensorData(ids, torch.zeros(4, dtype=torch.int64), mask=mask)
    cpu = torch.device("cpu")
    per_member = [target_log_probs(m, data, 3, cpu) for m in members]
    measured = token_metrics_of(ensemble_log_probs([lp for lp, _ in per_member]), per_member[0][1])

    # By hand: each member's softmax over the vocabulary, their mean, the mean over the real
    # targets of -log (mean probability of the target).
    with torch.no_grad():
        probs = [m(ids, attention_mask=mask).logits.double().softmax(-1) for m in members]
    mean = (probs[0] + probs[1]) / 2
    picked = mean[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    real = mask[:, 1:].bool()
    expected = float(-picked.log()[real].mean())
    assert measured["loss"] == pytest.approx(expected, abs=1e-6)
    assert measured["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # Not one member's loss, nor the mean of their losses (which is larger, by Jensen).
    own = [token_metrics_of(*p)["loss"] for p in per_member]
    assert measured["loss"] < sum(own) / 2 - 0.1
