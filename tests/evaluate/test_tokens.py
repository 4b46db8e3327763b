"""Next-token cross-entropy against a loop over positions, and the fit's token losses
(causal_lm, distill, entropy) on per-token logits, with and without padding."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mergecli.data import TensorData
from mergecli.evaluate.tokens import causal_lm_loss, next_token_losses
from mergecli.fit import step as fit_step


def loop_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, mask=None) -> float:
    """-log softmax(logits[n, t])[ids[n, t + 1]], averaged over the real targets, in float64
    one position at a time."""
    total, count = 0.0, 0
    for n in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask is not None and not mask[n, t + 1]:
                continue
            row = logits[n, t].double()
            total += float(torch.logsumexp(row, 0) - row[ids[n, t + 1]])
            count += 1
    return total / count


def test_causal_lm_loss_is_the_mean_next_token_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator) * 3
    ids = torch.randint(0, 11, (3, 7), generator=generator)
    expected = loop_cross_entropy(logits, ids)
    assert float(causal_lm_loss(logits, ids)) == pytest.approx(expected, abs=1e-6)
    total, count = next_token_losses(logits, ids)
    assert int(count) == 3 * 6
    assert float(total) == pytest.approx(expected * 18, abs=1e-5)


def test_padding_is_not_predicted() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=generator)
    ids = torch.randint(0, 9, (2, 6), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    expected = loop_cross_entropy(logits, ids, mask)
    assert float(causal_lm_loss(logits, ids, mask)) == pytest.approx(expected, abs=1e-6)
    assert int(next_token_losses(logits, ids, mask)[1]) == 5 + 2
    # what padding holds does not matter
    changed_ids, changed_logits = ids.clone(), logits.clone()
    changed_ids[1, 4:] = 0
    changed_logits[1, 3:] = 100.0
    assert float(causal_lm_loss(changed_logits, changed_ids, mask)) == pytest.approx(
        expected, abs=1e-6
    )


def test_matches_transformers_own_loss() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 40, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        output = model(ids, attention_mask=mask, labels=labels)
    ours = causal_lm_loss(output.logits, ids, mask)
    assert float(ours) == pytest.approx(float(output.loss), abs=1e-5)


def fit_losses(kind: str, data: TensorData, monkeypatch=None, teacher=None):
    """The fit's loss function of ``kind`` over ``data`` (a teacher stands in for the models)."""
    if teacher is not None:
        monkeypatch.setattr(fit_step, "_mean_softmax", lambda *_: teacher)
    return fit_step._loss(kind, SimpleNamespace(), data, [], torch.device("cpu"))


def test_fit_causal_lm_looks_up_the_batch_ids_by_index() -> None:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 13, (8, 5), generator=generator)
    loss = fit_losses("causal_lm", TensorData(ids, torch.zeros(8, dtype=torch.int64)))
    index = torch.tensor([6, 1, 3])
    logits = torch.randn(3, 5, 13, generator=generator)
    assert float(loss(logits, index)) == pytest.approx(
        loop_cross_entropy(logits, ids[index]), abs=1e-6
    )
    with pytest.raises(Exception, match=r"per-token logits \(N, L, V\)"):
        loss(torch.randn(3, 13), index)
    floats = TensorData(torch.randn(8, 5), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(Exception, match="causal_lm predicts the next token of token ids"):
        fit_losses("causal_lm", floats)


@pytest.mark.parametrize("padded", [False, True])
def test_distill_and_entropy_over_token_distributions(
    monkeypatch: pytest.MonkeyPatch, padded: bool
) -> None:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (4, 5), generator=generator)
    mask = torch.ones(4, 5, dtype=torch.int64)
    mask[2, 3:] = 0  # the second example of the batch below ends early
    teacher = torch.softmax(torch.randn(4, 5, 7, generator=generator), dim=-1)
    data = TensorData(ids, torch.zeros(4, dtype=torch.int64), mask=mask if padded else None)
    index = torch.tensor([0, 2])
    logits = torch.randn(2, 5, 7, generator=generator)
    # per real token: KL(teacher || student) and the student's entropy, averaged over tokens
    kls, entropies = [], []
    for n, row in enumerate(index.tolist()):
        for t in range(5):
            if padded and not mask[row, t]:
                continue
            p = teacher[row, t].double()
            log_q = torch.log_softmax(logits[n, t].double(), 0)
            kls.append(float((p * (p.log() - log_q)).sum()))
            entropies.append(float(-(log_q.exp() * log_q).sum()))
    assert len(kls) == (8 if padded else 10)
    distill = fit_losses("distill", data, monkeypatch, teacher)
    assert float(distill(logits, index)) == pytest.approx(sum(kls) / len(kls), abs=1e-6)
    entropy = fit_losses("entropy", data)
    assert float(entropy(logits, index)) == pytest.approx(sum(entropies) / len(entropies), abs=1e-6)
    assert math.isfinite(float(entropy(torch.randn(2, 7), index)))  # classifiers as before


def test_fit_causal_lm_ignores_padding() -> None:
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 9, (3, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 2:] = 0
    loss = fit_losses("causal_lm", TensorData(ids, torch.zeros(3, dtype=torch.int64), mask=mask))
    index = torch.tensor([1, 2])
    logits = torch.randn(2, 6, 9, generator=generator)
    expected = loop_cross_entropy(logits, ids[index], mask[index])
    assert float(loss(logits, index)) == pytest.approx(expected, abs=1e-6)
