"""CCA Merge: maps through BatchNorm (paper and fold), float64 and dead units."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergecli.align.activations import PairStatistics
from mergecli.align.cca import cca_transform, constant_units
from mergecli.align.spec import derive_spec
from mergecli.align.transform import apply_transforms, fold_norms

F64 = torch.float64


def _stats_from(x: torch.Tensor, y: torch.Tensor) -> PairStatistics:
    """Statistics as pair_statistics sums them: float64 sums of the activations given."""
    x, y = x.double(), y.double()
    return PairStatistics(len(x), x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)


def _dead_pair(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU activations of two 'models' of 12 units that share 7 signals; X has 3 dead units,
    Y has 1 (so Y also has 2 live units that correlate with nothing in X)."""
    g = torch.Generator().manual_seed(0)
    signals = torch.randn(4000, 9, generator=g, dtype=F64)
    mix_x = torch.randn(9, 12, generator=g, dtype=F64)
    mix_y = torch.randn(9, 12, generator=g, dtype=F64)
    mix_x[7:], mix_y[:7][:, 10:] = 0, 0  # X sees signals 0-6 only; Y's 10, 11 see 7-8 only
    x = (signals @ mix_x).to(dtype).relu()
    y = (signals @ mix_y).to(dtype).relu()
    x[:, [2, 5, 9]] = 0
    y[:, [4]] = 0
    return x, y


def test_float32_activations_give_the_float64_transform() -> None:
    # The cross-covariance has a 3-dimensional null space on each side; an SVD pairs those by
    # rounding, so float32 inputs used to move the map by half its size. Paired in unit order,
    # float32 and float64 agree to float32 precision (stated: 1e-5 of the map's norm).
    (x32, y32), (x64, y64) = _dead_pair(torch.float32), _dead_pair(F64)
    for gamma in (1.0, 0.01):
        m32, inv32 = cca_transform(_stats_from(x32, y32), gamma)
        m64, inv64 = cca_transform(_stats_from(x64, y64), gamma)
        assert m32.dtype == m64.dtype == F64
        assert (m32 - m64).norm() <= 1e-5 * m64.norm(), gamma
        assert (inv32 - inv64).norm() <= 1e-5 * inv64.norm(), gamma
        torch.testing.assert_close(m64 @ inv64, torch.eye(12, dtype=F64))
    # Statistics kept in float32 are computed in float64 all the same.
    s = _stats_from(x64, y64)
    low = PairStatistics(s.count, *(t.float() for t in (s.sum_x, s.sum_y, s.sum_xx, s.sum_yy)),
                         s.sum_xy.float())  # fmt: skip
    assert (cca_transform(low)[0] - cca_transform(s)[0]).norm() <= 1e-5 * m64.norm()


def test_dead_units_map_onto_dead_units() -> None:
    x, y = _dead_pair(F64)
    m, _ = cca_transform(_stats_from(x, y), gamma=1.0)
    # Y's dead unit 4 goes to X's first dead unit (2), unscaled and alone: it stays dead.
    expected = torch.zeros(12, dtype=F64)
    expected[2] = 1
    torch.testing.assert_close(m[:, 4], expected)
    torch.testing.assert_close(m[2], expected.roll(2))  # row 2 reads only unit 4
    # X's other dead units (5, 9) take the two live Y directions that correlate with nothing.
    assert m[[5, 9]][:, [10, 11]].abs().sum() > 0.5
    assert constant_units(_stats_from(x, y)) == (3, 1)


def test_constant_units_counts_constant_nonzero_units_too() -> None:
    x = torch.randn(500, 4, dtype=F64)
    x[:, 1] = 3.0  # constant but not zero: no variance, no correlation
    assert constant_units(_stats_from(x, x)) == (1, 1)


class ConvBN(nn.Module):
    """conv -> BatchNorm -> [ReLU] -> conv -> pool -> linear; one group of 5 channels."""

    def __init__(self, relu: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5, eps=eps)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.conv2 = nn.Conv2d(5, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn(self.conv1(x))))


def _bn_model(relu: bool, eps: float = 1e-5) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvBN(relu, eps).double().eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(4, 2, 6, 6, dtype=F64)


def _pair(m: torch.Tensor) -> torch.Tensor:
    return torch.stack([m, torch.linalg.inv(m)])


def _general_map() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 5, generator=g, dtype=F64) + 3 * torch.eye(5, dtype=F64)


def test_spec_names_each_batchnorms_producer() -> None:
    model, x = _bn_model(relu=True)
    (group,) = derive_spec(model, x).groups
    norms = {m.tensor: (m.role, m.producer, m.eps) for m in group.members if "bn" in m.tensor}
    assert norms == {
        f"bn.{n}": ("unit_norm", "conv1.", 1e-5)
        for n in ("weight", "bias", "running_mean", "running_var")
    }


@pytest.mark.parametrize("batchnorm", ["paper", "fold"])
def test_a_permutation_as_a_matrix_passes_batchnorm_exactly(batchnorm: str) -> None:
    model, x = _bn_model(relu=True)
    spec = derive_spec(model, x)
    perm = torch.tensor([3, 0, 4, 1, 2])
    state = model.state_dict()
    as_index = apply_transforms(state, spec, {"conv1": perm})
    as_matrix = apply_transforms(
        state, spec, {"conv1": _pair(torch.eye(5, dtype=F64)[perm])}, batchnorm
    )
    out = torch.func.functional_call(model, as_matrix, (x,))
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    # The very tensors a permutation gives: products with 0 and 1 and sums with zeros are
    # exact in any order, so the matrix route is bit-equal to indexing on any CPU.
    if batchnorm == "paper":
        for key in state:
            torch.testing.assert_close(as_matrix[key], as_index[key], rtol=0, atol=1e-15)


@pytest.mark.parametrize("batchnorm", ["paper", "fold"])
def test_a_positive_scaled_permutation_passes_batchnorm_and_relu(batchnorm: str) -> None:
    # M = P D with D > 0: BN(M z) = M BN(z) when the variance maps by M∘M (the code of CCA
    # Merge maps it by M, which gives D, not D^2), and ReLU(D y) = D ReLU(y). eps is what a
    # scaling does not commute with in the paper's mapping, so this model has none.
    model, x = _bn_model(relu=True, eps=0.0)
    spec = derive_spec(model, x)
    m = torch.eye(5, dtype=F64)[[2, 0, 1, 4, 3]] * torch.tensor([0.5, 2.0, 3.0, 0.7, 1.3])
    mapped = apply_transforms(model.state_dict(), spec, {"conv1": _pair(m)}, batchnorm)
    out = torch.func.functional_call(model, mapped, (x,))
    torch.testing.assert_close(out, model(x), rtol=1e-10, atol=1e-10)


def test_paper_mapping_is_the_formula_of_cca_merge() -> None:
    # Conv rows, BN weight, bias and running mean by M; running variance by M∘M.
    model, x = _bn_model(relu=True)
    spec = derive_spec(model, x)
    m = _general_map()
    state = model.state_dict()
    mapped = apply_transforms(state, spec, {"conv1": _pair(m)}, "paper")
    torch.testing.assert_close(
        mapped["conv1.weight"], torch.einsum("uo,oihw->uihw", m, state["conv1.weight"])
    )
    for name in ("conv1.bias", "bn.weight", "bn.bias", "bn.running_mean"):
        torch.testing.assert_close(mapped[name], m @ state[name])
    torch.testing.assert_close(mapped["bn.running_var"], (m * m) @ state["bn.running_var"])
    torch.testing.assert_close(
        mapped["conv2.weight"][:, :, 0, 0], state["conv2.weight"][:, :, 0, 0] @ torch.linalg.inv(m)
    )


def test_paper_mapping_keeps_the_mean_of_the_mapped_preactivations() -> None:
    # What is exact for any M: the mapped conv outputs are M z, and their mean is the mapped
    # running mean when the running mean was the mean of z on the same data.
    model, x = _bn_model(relu=True)
    spec = derive_spec(model, x)
    z = model.conv1(x)
    with torch.no_grad():
        model.bn.running_mean.copy_(z.mean((0, 2, 3)))
    m = _general_map()
    mapped = apply_transforms(model.state_dict(), spec, {"conv1": _pair(m)}, "paper")
    conv = nn.Conv2d(2, 5, 3, padding=1).double()
    conv.load_state_dict({"weight": mapped["conv1.weight"], "bias": mapped["conv1.bias"]})
    z_mapped = conv(x)
    torch.testing.assert_close(z_mapped, torch.einsum("uo,nohw->nuhw", m, z))
    torch.testing.assert_close(z_mapped.mean((0, 2, 3)), mapped["bn.running_mean"])


def test_fold_maps_the_batchnorm_output_exactly() -> None:
    # With the norm's scale folded into the conv, M acts on the BN's output: in eval mode the
    # mapped BN gives M y for ANY invertible M (eps included), so a network without a
    # nonlinearity keeps its function; the paper's mapping does not.
    model, x = _bn_model(relu=False)
    spec = derive_spec(model, x)
    m = _general_map()
    mapped = apply_transforms(model.state_dict(), spec, {"conv1": _pair(m)}, "fold")
    out = torch.func.functional_call(model, mapped, (x,))
    torch.testing.assert_close(out, model(x), rtol=1e-10, atol=1e-10)
    probe = ConvBN(relu=False).double().eval()
    probe.conv2 = nn.Identity()
    y = torch.func.functional_call(probe, {k: v for k, v in model.state_dict().items()
                                           if not k.startswith("conv2")}, (x,))  # fmt: skip
    y_mapped = torch.func.functional_call(
        probe, {k: v for k, v in mapped.items() if not k.startswith("conv2")}, (x,)
    )
    torch.testing.assert_close(y_mapped, torch.einsum("uo,nohw->nuhw", m, y))
    paper = apply_transforms(model.state_dict(), spec, {"conv1": _pair(m)}, "paper")
    assert not torch.allclose(torch.func.functional_call(model, paper, (x,)), model(x))


def test_folding_the_reference_keeps_its_function() -> None:
    model, x = _bn_model(relu=True)
    spec = derive_spec(model, x)
    folded = fold_norms(model.state_dict(), spec, {"conv1"})
    assert not torch.allclose(folded["conv1.weight"], model.conv1.weight)
    out = torch.func.functional_call(model, folded, (x,))
    torch.testing.assert_close(out, model(x), rtol=1e-10, atol=1e-10)
    # The identity map with fold is the fold: the reference and the others share one basis.
    eye = apply_transforms(model.state_dict(), spec, {"conv1": _pair(torch.eye(5, dtype=F64))},
                           "fold")  # fmt: skip
    for key, tensor in folded.items():
        torch.testing.assert_close(eye[key], tensor)
