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
