"""`model: {arch: hf}`: a Hugging Face transformers model built from a model directory's
config.json, its head chosen from ``config.architectures``; the weights come from the
checkpoints, as for every other architecture.

What code runs is decided by transformers' own registry of built-in model types (AutoConfig's
``model_type`` mapping and the AutoModel head mappings), never by a class name read from the
file and looked up freely: that registry is the allow-list. Code shipped in a model directory
(``auto_map``) runs only when the recipe says ``trust_remote_code: true``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from mergecli.errors import MergeCliError, one_line
from mergecli.models._args import boolean

HF_ARCH = "hf"
INSTALL = "pip install 'mergecli[hf]'"

# head: (transformers' Auto class, its model_type -> class names mapping, the suffixes of
# architecture names that mean this head where that mapping does not name them).
HEADS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "causal_lm": (
        "AutoModelForCausalLM",
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        ("ForCausalLM", "LMHeadModel"),
    ),
    "sequence_classification": (
        "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        ("ForSequenceClassification",),
    ),
    "token_classification": (
        "AutoModelForTokenClassification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        ("ForTokenClassification",),
    ),
    "masked_lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("ForMaskedLM",)),
    "image_classification": (
        "AutoModelForImageClassification",
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        ("ForImageClassification",),
    ),
    # A bare model (``BertModel``, ``LlamaModel``): hidden states, no head. Checked last, as
    # ``GPT2LMHeadModel`` ends in "Model" too.
    "base": ("AutoModel", "MODEL_MAPPING_NAMES", ("Model",)),
}


def hf(
    *, config: str | None = None, head: str | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """A Hugging Face transformers model, built from the model directory's config.json.

    Needs ``pip install 'mergecli[hf]'``; ``head`` and ``trust_remote_code`` as the README says.
    """
    transformers = _transformers()
    trust = boolean(HF_ARCH, "trust_remote_code", trust_remote_code)
    folder = _config_folder(config)
    loaded = _auto_config(transformers, folder, trust)
    chosen = _head(loaded, head, folder, trust)
    _quiet(loaded)
    model = _from_config(transformers, loaded, chosen, folder, trust)
    # Dropout off (and zeroed above, for steps that put a module in train mode for BatchNorm).
    return model.eval()


def model_directory(checkpoint: str | Path) -> Path:
    """Where a checkpoint's config.json would be: the checkpoint itself when it is a directory
    (save_pretrained's layout), else the directory of its file."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def _transformers() -> ModuleType:
    """transformers, imported only when a recipe asks for it (an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise MergeCliError(f"model: {{arch: hf}} needs transformers: {INSTALL}") from None
    return transformers


def _config_folder(config: str | None) -> Path:
    """The directory holding config.json: ``model.args.config`` (a directory or the
    config.json itself), which the run sets to the reference checkpoint's directory."""
    if config is None:
        raise MergeCliError(
            "model.args.config: model: {arch: hf} reads config.json from the reference "
            "checkpoint's directory, and there is none here; give the checkpoints as model "
            "directories (save_pretrained) or set model.args.config to one"
        )
    if not isinstance(config, (str, Path)) or not str(config):
        raise MergeCliError(
            f"model.args.config: expected the path of a model directory, got {config!r}"
        )
    path = Path(config)
    folder = path.parent if path.name == "config.json" and path.is_file() else path
    if not (folder / "config.json").is_file():
        where = "no such directory" if not folder.is_dir() else "it has no config.json"
        raise MergeCliError(
            f"{folder}: model: {{arch: hf}} builds the model from this directory's "
            f"config.json, but {where}; save the model with save_pretrained (which writes "
            "config.json) or set model.args.config to a directory that has one"
        )
    return folder


def _auto_config(transformers: ModuleType, folder: Path, trust: bool) -> Any:
    """The directory's config through AutoConfig, read from local files only. Its
    ``model_type`` must be one transformers has built in, unless the recipe trusts the
    directory's own code (``auto_map``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    file = folder / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeCliError(f"{file}: not a readable JSON config ({one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise MergeCliError(f"{file}: expected a JSON object, got a {type(raw).__name__}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        # Without it AutoConfig would guess the type from the directory's name.
        raise MergeCliError(
            f"{file}: has no model_type, so transformers cannot tell which model it is; "
            "re-save the model with save_pretrained"
        )
    if model_type not in CONFIG_MAPPING_NAMES and not trust:
        if "auto_map" in raw:
            raise MergeCliError(
                f"{file}: model_type '{model_type}' is not built into transformers and its "
                "auto_map names code in the model directory, which runs only when the recipe "
                "trusts it: `model: {arch: hf, args: {trust_remote_code: true}}`"
            )
        raise MergeCliError(
            f"{file}: model_type '{model_type}' is not one transformers "
            f"{transformers.__version__} knows; upgrade transformers, or check the config"
        )
    try:
        return transformers.AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust
        )
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError, ...
        raise MergeCliError(
            f"{file}: transformers cannot read this config ({one_line(exc)[:300]})"
        ) from None


def _names(mapping: str, model_type: str) -> tuple[str, ...]:
    """The class names transformers' ``mapping`` has for ``model_type`` (none: empty)."""
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, mapping, {}).get(model_type, ())
    return (names,) if isinstance(names, str) else tuple(names)


def _head(config: Any, head: Any, folder: Path, trust: bool) -> str:
    """``model.args.head``, else the head ``config.architectures[0]`` names."""
    heads = ", ".join(HEADS)
    if head is not None:
        if head not in HEADS:
            raise MergeCliError(f"model.args.head: unknown head {head!r}; the heads are: {heads}")
        return head
    architectures = getattr(config, "architectures", None) or []
    if not architectures or not isinstance(architectures[0], str):
        raise MergeCliError(
            f"{folder / 'config.json'}: names no architectures, so the head is unknown; set "
            f"model.args.head to one of: {heads}"
        )
    wanted = architectures[0]
    for name, (_, mapping, _) in HEADS.items():
        if wanted in _names(mapping, config.model_type):
            return name
    if trust:
        # Code from the model directory is in no mapping: go by the name's suffix.
        for name, (_, _, suffixes) in HEADS.items():
            if wanted.endswith(suffixes):
                return name
    raise MergeCliError(
        f"{folder / 'config.json'}: architecture '{wanted}' is not a model with a head mergecli "
        f"builds (of transformers' classes for model_type '{config.model_type}'); set "
        f"model.args.head to one of: {heads}"
    )


def _quiet(config: Any) -> None:
    """Dropout probabilities to 0 and no key/value cache: the module only scores batches."""
    for key, value in config.to_dict().items():
        dropout = "dropout" in key or key.endswith("_pdrop")
        if dropout and isinstance(value, float) and hasattr(config, key):
            setattr(config, key, 0.0)
    if hasattr(config, "use_cache"):
        config.use_cache = False


def _from_config(
    transformers: ModuleType, config: Any, head: str, folder: Path, trust: bool
) -> nn.Module:
    """``AutoModelFor<head>.from_config``: the class transformers maps the config's type to.

    Built in torch's default dtype, whatever dtype config.json names (from_config would build
    in that one), since steps compute in float32. Attention through SDPA: the fit calls the
    model with torch.func.functional_call and needs first derivatives only, which SDPA has,
    and its fused kernels do not keep the (L, L) attention matrix for the backward pass as
    eager attention does; a model without SDPA falls back to eager."""
    auto = getattr(transformers, HEADS[head][0])
    major = int(transformers.__version__.split(".")[0])
    dtype_key = "dtype" if major >= 5 else "torch_dtype"
    kwargs = {dtype_key: torch.get_default_dtype(), "trust_remote_code": trust}
    # transformers' advice on building a model (e.g. a head used on its own) is not the
    # user's to act on here: our own checks say what does not fit, in one line.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            return auto.from_config(config, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as exc:
            if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc):
                raise
            return auto.from_config(config, attn_implementation="eager", **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise MergeCliError(
                f"{folder}: transformers cannot build this model ({one_line(exc)[:300]})"
            ) from None
        has = [h for h, (_, m, _) in HEADS.items() if _names(m, config.model_type)]
        raise MergeCliError(
            f"model.args.head: transformers has no {head} head for model_type "
            f"'{config.model_type}' ({folder}); its heads here are: {', '.join(has) or 'none'}"
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def example_input(module: nn.Module, seed: int = 0) -> torch.Tensor | None:
    """Two made-up examples of what a transformers model reads, from its config: token ids
    below the vocabulary size, or images of the configured size; None for other inputs."""
    config = getattr(module, "config", None)
    generator = torch.Generator().manual_seed(seed)
    name = getattr(module, "main_input_name", None)
    if name == "input_ids" and getattr(config, "vocab_size", None):
        positions = getattr(config, "max_position_embeddings", None) or 16
        return torch.randint(0, config.vocab_size, (2, min(16, positions)), generator=generator)
    if name == "pixel_values" and getattr(config, "image_size", None):
        size = config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(config, "num_channels", 3)
        return torch.randn(2, channels, *size, generator=generator)
    return None
