"""Reading logits from whatever a model returns, and calling it with an attention mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixtures.token_models import TokenClassifier
from mergecli.data import TensorData, TokenBatch
from mergecli.errors import MergeCliError
from mergecli.models.forward import functional_logits, logits_from, model_logits


class _Output(dict):
    """What a Hugging Face ModelOutput is: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        return self[name]


def test_logits_are_read_from_every_output_shape() -> None:
    logits = torch.randn(3, 4)
    assert logits_from(logits) is logits
    assert logits_from(_Output(logits=logits, hidden=torch.zeros(1))) is logits
    assert logits_from({"logits": logits}) is logits
    assert logits_from((logits, torch.zeros(1))) is logits
    assert logits_from([logits]) is logits


@pytest.mark.parametrize("outputs", [{"loss": torch.zeros(())}, (), "text", None])
def test_an_output_without_logits_is_one_clear_error(outputs) -> None:
    with pytest.raises(MergeCliError, match="holds no logits tensor"):
        logits_from(outputs)


def test_the_mask_reaches_the_model_and_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    model = TokenClassifier().eval()
    ids = torch.randint(0, 32, (2, 5))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.int64)], dim=1)
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1).long()
    expected = model(ids)["logits"]
    masked = model_logits(model, TokenBatch(padded, mask))
    torch.testing.assert_close(masked, expected, rtol=1e-6, atol=1e-6)
    weights = {k: v * 1.0 for k, v in model.state_dict().items()}
    functional = functional_logits(model, weights, TokenBatch(padded, mask))
    torch.testing.assert_close(functional, expected, rtol=1e-6, atol=1e-6)


def test_batches_carry_the_mask_with_the_ids_through_a_shuffle() -> None:
    ids = torch.arange(12).reshape(6, 2)
    mask = (ids % 3 != 0).long()
    data = TensorData(ids, torch.arange(6), mask=mask)
    generator = torch.Generator().manual_seed(0)
    seen = 0
    for x, y in data.batches(4, shuffle=True, generator=generator):
        assert isinstance(x, TokenBatch) and x.ids.dtype == torch.int64
        torch.testing.assert_close(x.ids, ids[y])
        torch.testing.assert_close(x.mask, mask[y])
        seen += len(x)
    assert seen == 6
    part = data.take(torch.tensor([4, 1]))
    torch.testing.assert_close(part.mask, mask[[4, 1]])
    assert part.with_labels(torch.zeros(2, dtype=torch.int64)).mask is part.mask


def test_a_model_of_tokens_is_not_given_floats() -> None:
    model = nn.Embedding(10, 3)
    assert model_logits(model, torch.tensor([[1, 2]])).shape == (1, 2, 3)
