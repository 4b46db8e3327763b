"""Tests for mergecli.models: built-in architectures, user plugins, and checkpoint loading."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from mergecli.errors import MergeCliError
from mergecli.models import build_model, builtin_architectures, load_into_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _out_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        return tuple(model(x).shape)


# --- built-in architectures ---------------------------------------------------------------


def test_builtin_names() -> None:
    assert set(builtin_architectures()) == {"mlp", "vgg", "resnet20", "vit", "hf"}


@pytest.mark.parametrize(
    ("arch", "args", "input_shape", "classes"),
    [
        ("mlp", {}, (2, 1, 28, 28), 10),
        ("mlp", {"hidden": 32, "depth": 3, "num_classes": 5, "batchnorm": True}, (3, 784), 5),
        ("mlp", {"in_features": 12, "depth": 1}, (2, 3, 4), 10),
        ("vgg", {"width": 0.125}, (2, 3, 32, 32), 10),
        ("vgg", {"width": 0.125, "batchnorm": True}, (2, 3, 32, 32), 10),
        ("vgg", {"variant": 16, "width": 0.125}, (2, 3, 32, 32), 10),
        ("vgg", {"variant": 16, "width": 0.125, "batchnorm": True}, (2, 3, 32, 32), 10),
        ("vgg", {"width": 0.125, "in_channels": 1}, (2, 1, 28, 28), 10),
        ("vgg", {"variant": 16, "width": 0.125, "in_channels": 1, "batchnorm": True},
         (2, 1, 28, 28), 10),
        ("vgg", {"width": 0.0625, "num_classes": 100}, (2, 3, 32, 32), 100),
        ("resnet20", {}, (2, 3, 32, 32), 10),
        ("resnet20", {"width": 2, "num_classes": 7}, (2, 3, 32, 32), 7),
        ("resnet20", {"width": 0.5, "in_channels": 1}, (2, 1, 28, 28), 10),
        ("vit", {}, (2, 3, 32, 32), 10),
        ("vit", {"image_size": 28, "patch": 7, "in_channels": 1, "dim": 32, "depth": 2,
                 "heads": 2, "mlp_dim": 48, "num_classes": 3, "dropout": 0.1}, (2, 1, 28, 28), 3),
    ],
)  # fmt: skip
def test_builtin_forward_shape(
    arch: str, args: dict, input_shape: tuple[int, ...], classes: int
) -> None:
    model = build_model(arch, args)
    assert _out_shape(model, torch.randn(*input_shape)) == (input_shape[0], classes)


def test_vgg_defaults_build() -> None:
    model = build_model("vgg", None)
    assert model.head.in_features == 512
    assert _out_shape(model, torch.randn(1, 3, 32, 32)) == (1, 10)


def test_mlp_depth_counts_linear_layers() -> None:
    model = build_model("mlp", {"depth": 8})
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 8
    assert len(model.layers) == 7
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())

    only_head = build_model("mlp", {"depth": 1})
    assert len(only_head.layers) == 0
    assert only_head.head.in_features == 784


def test_mlp_batchnorm_adds_bn_modules() -> None:
    model = build_model("mlp", {"depth": 4, "hidden": 16, "batchnorm": True})
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 3
    assert "norms.0.running_mean" in model.state_dict()


def test_resnet20_parameter_count() -> None:
    count = sum(p.numel() for p in build_model("resnet20").parameters())
    assert abs(count - 270_000) / 270_000 < 0.10
    wide = sum(p.numel() for p in build_model("resnet20", {"width": 2}).parameters())
    assert 3.5 < wide / count < 4.5  # conv weights scale with width squared


def resnet20_count(width: float, shortcut_kernel: int, classes: int) -> int:
    """ResNet-20's parameters counted from its description (He et al. 2016, 4.2): a 3x3 stem,
    3 stages x 3 blocks of two 3x3 convs (no bias, each with a BatchNorm: 2 per channel), a
    k x k projection + BN where the width changes, a Linear head."""
    c1, c2, c3 = (round(c * width) for c in (16, 32, 64))
    count = 3 * c1 * 9 + 2 * c1
    previous = c1
    for channels in (c1, c2, c3):
        for _ in range(3):
            count += previous * channels * 9 + channels * channels * 9 + 4 * channels
            if previous != channels:
                count += previous * channels * shortcut_kernel**2 + 2 * channels
            previous = channels
    return count + previous * classes + classes


def vgg_count(variant: int, classes: int) -> int:
    """CIFAR VGG-BN: 3x3 convs (no bias under BN) of the published channel lists, a BN each, a
    512 -> classes head (Simonyan & Zisserman's configurations A and D without the FC stack)."""
    channels = {
        11: [64, 128, 256, 256, 512, 512, 512, 512],
        16: [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    }[variant]
    count, previous = 0, 3
    for c in channels:
        count += previous * c * 9 + 2 * c
        previous = c
    return count + 512 * classes + classes


def n_params(arch: str, args: dict) -> int:
    return sum(p.numel() for p in build_model(arch, args).parameters())


@pytest.mark.parametrize("width", [1, 4, 8])
@pytest.mark.parametrize("classes", [10, 100])
def test_papers_resnet20_and_vgg_parameter_counts(width: int, classes: int) -> None:
    # ResNet-20x{1,4,8} with 1x1 projections (option B), as the merging papers train them.
    args = {"width": width, "shortcut": "conv1x1", "num_classes": classes}
    assert n_params("resnet20", args) == resnet20_count(width, 1, classes)
    assert n_params("resnet20", {**args, "shortcut": "conv3x3"}) == resnet20_count(
        width, 3, classes
    )
    if width == 1:
        vgg16 = n_params("vgg", {"variant": 16, "batchnorm": True, "num_classes": classes})
        assert vgg16 == vgg_count(16, classes)
        assert n_params("vgg", {"batchnorm": True, "num_classes": classes}) == vgg_count(
            11, classes
        )


def test_resnet20_and_vgg16_match_the_published_sizes() -> None:
    # He et al. 2016, Table 6: ResNet-20 on CIFAR-10 has 0.27M parameters.
    resnet = n_params("resnet20", {"shortcut": "conv1x1"})
    assert resnet == 272_474 and round(resnet / 1e6, 2) == 0.27
    # The CIFAR VGG-16-BN (global pool, one Linear head): about 15M (14.7M).
    vgg16 = n_params("vgg", {"variant": 16, "batchnorm": True})
    assert vgg16 == 14_724_042 and round(vgg16 / 1e6) == 15
    # VGG-11-BN: 9.2M.
    assert round(n_params("vgg", {"variant": 11, "batchnorm": True}) / 1e6, 1) == 9.2


def test_resnet20_shortcut_is_checked() -> None:
    model = build_model("resnet20", {"shortcut": "conv1x1"})
    conv = model.layer3[0].shortcut[0]
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.padding == (0, 0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(MergeCliError) as info:
        build_model("resnet20", {"shortcut": "1x1"})
    assert str(info.value) == (
        "model.args.shortcut: resnet20 has shortcuts conv3x3, conv1x1, got '1x1'; "
        "set model.args.shortcut to one of them"
    )


def test_resnet20_shortcuts() -> None:
    model = build_model("resnet20")
    assert len(model.layer1[0].shortcut) == 0  # identity where the shape is unchanged
    conv = model.layer2[0].shortcut[0]
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (3, 3) and conv.stride == (2, 2)


@pytest.mark.parametrize(
    ("arch", "args", "input_shape"),
    [
        ("mlp", {"depth": 3, "hidden": 16}, (2, 1, 28, 28)),
        ("mlp", {"depth": 3, "hidden": 16, "batchnorm": True}, (2, 1, 28, 28)),
        ("vgg", {"width": 0.125, "batchnorm": True}, (2, 3, 32, 32)),
        ("vgg", {"variant": 16, "width": 0.125}, (2, 3, 32, 32)),
        ("resnet20", {}, (2, 3, 32, 32)),
        ("vit", {"dim": 32, "depth": 2, "heads": 4}, (2, 3, 32, 32)),
    ],
)
def test_builtins_are_fx_traceable(arch: str, args: dict, input_shape: tuple[int, ...]) -> None:
    model = build_model(arch, args).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(*input_shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    # Weights must be reached through submodules, so alignment can see them in the graph.
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "head" in called


@pytest.mark.parametrize(
    ("arch", "args", "fragments"),
    [
        ("mlp", {"depth": 0}, ["model.args.depth", ">= 1", "0"]),
        ("mlp", {"hidden": 0}, ["model.args.hidden"]),
        ("mlp", {"hidden": "128"}, ["model.args.hidden", "'128'"]),
        ("mlp", {"batchnorm": "yes"}, ["model.args.batchnorm"]),
        ("vgg", {"variant": 13}, ["model.args.variant", "11, 16", "13"]),
        ("vgg", {"width": 0}, ["model.args.width"]),
        ("resnet20", {"width": -1}, ["model.args.width"]),
        ("vit", {"dim": 30, "heads": 4}, ["model.args.heads", "30", "4", "divisible"]),
        ("vit", {"image_size": 32, "patch": 5}, ["model.args.patch", "32", "5", "divisible"]),
        ("vit", {"dropout": 1.5}, ["model.args.dropout"]),
    ],
)
def test_builtin_bad_values(arch: str, args: dict, fragments: list[str]) -> None:
    with pytest.raises(MergeCliError) as info:
        build_model(arch, args)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_builtin_suggests_and_lists() -> None:
    with pytest.raises(MergeCliError) as info:
        build_model("resnet2O")
    message = str(info.value)
    assert "unknown architecture 'resnet2O'" in message
    assert "did you mean 'resnet20'" in message
    for name in ("mlp", "vgg", "resnet20", "vit"):
        assert name in message
    assert "package.module:factory" in message


def test_vgg_variant_in_name_is_pointed_to_args() -> None:
    with pytest.raises(MergeCliError, match="'vgg' with model.args.variant: 16"):
        build_model("vgg16")


def test_unknown_builtin_with_dot_suggests_colon() -> None:
    with pytest.raises(MergeCliError, match="'mymodels:tiny'"):
        build_model("mymodels.tiny")


def test_bad_keyword_names_allowed_parameters() -> None:
    with pytest.raises(MergeCliError) as info:
        build_model("mlp", {"hiden": 64})
    message = str(info.value)
    assert message.startswith("model.args: mlp() got an unexpected keyword argument 'hiden'")
    assert "did you mean 'hidden'" in message
    assert "in_features, hidden, depth, num_classes, batchnorm" in message


def test_args_must_be_a_mapping() -> None:
    with pytest.raises(MergeCliError, match="model.args"):
        build_model("mlp", [1, 2])  # type: ignore[arg-type]


# --- user plugins -------------------------------------------------------------------------

PLUGIN = """
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x)


def tiny(width=3):
    return Tiny(width)


def not_a_model():
    return 42


def broken(width=3):
    return len(width)


NOT_CALLABLE = 5
"""


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tmp_path as cwd; sys.path and the modules imported from it are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        # Only the plugin modules: dropping lazily imported torch internals would break torch.
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", None)):
            del sys.modules[name]


def _write_plugin(directory: Path, name: str, source: str = PLUGIN) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_user_plugin_from_cwd(plugin_dir: Path) -> None:
    _write_plugin(plugin_dir, "mymodels")
    model = build_model("mymodels:tiny", {"width": 6})
    assert isinstance(model, nn.Module)
    assert model(torch.randn(2, 4)).shape == (2, 6)
    assert str(plugin_dir) in sys.path


def test_user_plugin_in_package(plugin_dir: Path) -> None:
    package = plugin_dir / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _write_plugin(package, "nets")
    assert build_model("mypkg.nets:tiny").fc.out_features == 3


@pytest.mark.parametrize("arch", ["mymodels:", ":tiny", "my models:tiny", "a:b:c", "m:1x"])
def test_malformed_plugin_string(arch: str) -> None:
    with pytest.raises(MergeCliError) as info:
        build_model(arch)
    assert "package.module:factory" in str(info.value)
    assert arch in str(info.value)


def test_plugin_module_not_importable(plugin_dir: Path) -> None:
    with pytest.raises(MergeCliError) as info:
        build_model("no_such_models_here:tiny")
    message = str(info.value)
    assert "cannot import module 'no_such_models_here'" in message
    assert "No module named 'no_such_models_here'" in message
    assert "\n" not in message


def test_plugin_module_with_syntax_error(plugin_dir: Path) -> None:
    _write_plugin(plugin_dir, "badsyntax", "def tiny(:\n    pass\n")
    with pytest.raises(MergeCliError, match="'badsyntax'.*SyntaxError"):
        build_model("badsyntax:tiny")


def test_plugin_factory_missing(plugin_dir: Path) -> None:
    _write_plugin(plugin_dir, "mymodels_missing")
    with pytest.raises(MergeCliError) as info:
        build_model("mymodels_missing:tiyn")
    message = str(info.value)
    assert "has no 'tiyn'" in message
    assert "did you mean 'tiny'" in message
    assert "mymodels_missing.py" in message


def test_plugin_factory_not_callable(plugin_dir: Path) -> None:
    _write_plugin(plugin_dir, "mymodels_const")
    with pytest.raises(MergeCliError, match="'NOT_CALLABLE'.*not a function"):
        build_model("mymodels_const:NOT_CALLABLE")


def test_plugin_bad_args(plugin_dir: Path) -> None:
    (plugin_dir / "mymodels_kwargs.py").write_text(
        "from torch import nn\ndef lin(**kw):\n    return nn.Linear(4, 2, **kw)\n"
    )
    with pytest.raises(MergeCliError, match="unexpected keyword argument 'foo'"):
        build_model("mymodels_kwargs:lin", {"foo": 1})
    _write_plugin(plugin_dir, "mymodels_args")
    with pytest.raises(MergeCliError) as info:
        build_model("mymodels_args:tiny", {"widht": 4})
    message = str(info.value)
    assert "model.args: tiny() got an unexpected keyword argument 'widht'" in message
    assert "did you mean 'width'" in message
    assert "accepts: width" in message


def test_plugin_type_error_inside_factory(plugin_dir: Path) -> None:
    _write_plugin(plugin_dir, "mymodels_broken")
    with pytest.raises(MergeCliError) as info:
        build_model("mymodels_broken:broken")
    message = str(info.value)
    assert "'mymodels_broken:broken': the factory raised TypeError" in message
    assert "len()" in message


def test_plugin_not_returning_module(plugin_dir: Path) -> None:
    _write_plugin(plugin_dir, "mymodels_int")
    with pytest.raises(MergeCliError) as info:
        build_model("mymodels_int:not_a_model")
    message = str(info.value)
    assert "not_a_model() returned int" in message
    assert "nn.Module" in message


# --- load_into_model ----------------------------------------------------------------------


def _small_mlp() -> nn.Module:
    return build_model("mlp", {"in_features": 8, "hidden": 16, "depth": 3, "num_classes": 4})


def test_load_state_dict_from_same_model() -> None:
    source, target = _small_mlp().eval(), _small_mlp().eval()
    x = torch.randn(5, 8)
    assert not torch.allclose(source(x), target(x))
    load_into_model(target, source.state_dict(), "a.safetensors")
    torch.testing.assert_close(target(x), source(x))


def test_load_with_batchnorm_and_missing_counter() -> None:
    source = build_model("resnet20", {"width": 0.25})
    source.train()
    source(torch.randn(4, 3, 32, 32))  # changes running stats
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    target = build_model("resnet20", {"width": 0.25})
    load_into_model(target, state, "b.pt")
    torch.testing.assert_close(target.bn.running_mean, source.bn.running_mean)


def test_load_reports_every_problem_and_changes_nothing() -> None:
    model = _small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.randn_like(v) for k, v in _small_mlp().state_dict().items()}
    state["layers.1.weight"] = torch.randn(16, 9)
    del state["head.bias"]
    state["foo.weight"] = torch.randn(2)

    with pytest.raises(MergeCliError) as info:
        load_into_model(model, state, "ckpt/model_a.safetensors")
    message = str(info.value)
    assert message.startswith("ckpt/model_a.safetensors: does not fit the model: ")
    assert "missing 'head.bias'" in message
    assert "unexpected 'foo.weight'" in message
    assert "tensor 'layers.1.weight' has shape (16, 9), the model expects (16, 16)" in message
    assert "\n" not in message
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_load_truncates_long_problem_lists() -> None:
    model = _small_mlp()
    state = {f"junk.{i}": torch.zeros(1) for i in range(15)}
    with pytest.raises(MergeCliError) as info:
        load_into_model(model, state, "x.pt")
    message = str(info.value)
    total = len(model.state_dict()) + 15
    assert f"and {total - 10} more" in message
    assert message.count("'") // 2 == 10


def test_load_hints_at_extra_prefix() -> None:
    model = _small_mlp()
    state = {f"module.{k}": v for k, v in _small_mlp().state_dict().items()}
    with pytest.raises(MergeCliError, match="extra 'module.' prefix"):
        load_into_model(model, state, "dp.pt")
