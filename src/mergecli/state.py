"""MergeState: what the steps of one run share. Each step reads it and changes it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from mergecli.errors import MergeCliError
from mergecli.recipe.schema import CheckpointSpec, LoadedRecipe, ModelSpec, StepSpec
from mergecli.runtime.log import Log

if TYPE_CHECKING:
    from mergecli.data import TensorData

StateDict = dict[str, Tensor]


@dataclass
class Checkpoint:
    """One loaded input: its recipe entry, display name, file hash and tensors."""

    spec: CheckpointSpec
    name: str
    digest: str | Future[str]  # the sha256, or one being computed (`sha256_in_background`)
    tensors: StateDict
    metadata: dict[str, str]
    aligned: StateDict | None = None  # the tensors in the reference's basis, after `align`
    index: int = 0  # its place in the recipe's `checkpoints:`

    @property
    def sha256(self) -> str:
        """The file's sha256 (waits for it if it is still being computed)."""
        return self.digest if isinstance(self.digest, str) else self.digest.result()

    @property
    def digest_known(self) -> bool:
        return isinstance(self.digest, str) or self.digest.done()

    @property
    def aligned_or_original(self) -> StateDict:
        """The aligned tensors when an align step ran, else the originals: what merges use."""
        return self.aligned if self.aligned is not None else self.tensors

    @property
    def path(self) -> Path:
        return Path(self.spec.path)


@dataclass
class MergeState:
    """The reference and other checkpoints, the module and data, the merged result, the report."""

    loaded: LoadedRecipe
    checkpoints: list[Checkpoint]
    reference_index: int
    device: torch.device
    log: Log
    model_spec: ModelSpec | None
    merged: StateDict | Iterator[tuple[str, Tensor]] | None = None
    history: list[str] = field(default_factory=list)  # methods that shaped `merged`, in order
    step: StepSpec | None = None  # the step running now, set by the pipeline
    permutation_spec: Any = None  # the model's PermutationSpec, once an align step derived it
    resume_dir: Path | None = None  # where long steps keep resumable state (None: never)
    # Data-free recipes stream: inputs are read lazily and `merged` is an iterator of
    # (name, tensor) that the writer consumes, so a model never sits whole in memory.
    streaming: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    # Tensors some model lacks, taken unchanged from the base (merge `missing: copy_from_base`).
    copied_from_base: frozenset[str] = frozenset()
    # Extra files for the output dir (relative name -> tensors, metadata), written atomically
    # with the merged model at the end of a successful run.
    artifacts: dict[str, tuple[StateDict, dict[str, str]]] = field(default_factory=dict)
    # A merge that changes the tensors' names or count (passthrough with slices): the output's
    # names, shapes and dtypes (meta tensors), and the keys it changes in config.json.
    output_layout: Mapping[str, Tensor] | None = None
    config_updates: dict[str, Any] = field(default_factory=dict)
    _data: dict[str, Any] = field(default_factory=dict)

    def steps_before(self) -> list[StepSpec]:
        """The recipe's steps that ran before the current one."""
        return self.loaded.steps[: self.step.index] if self.step else []

    def steps_after(self) -> list[StepSpec]:
        """The recipe's steps that run after the current one."""
        return self.loaded.steps[self.step.index + 1 :] if self.step else []

    @property
    def reference(self) -> Checkpoint:
        return self.checkpoints[self.reference_index]

    @property
    def layout(self) -> Mapping[str, Tensor]:
        """The tensors whose names, shapes and dtypes the output has: the reference's, or the
        base's when tensors missing from some models are copied from it; a merge's own when it
        sets one."""
        if self.output_layout is not None:
            return self.output_layout
        if self.copied_from_base and self.base is not None:
            return self.base.tensors
        return self.reference.tensors

    @property
    def base(self) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.spec.role == "base"), None)

    def model_weights(self, what: str, models: list[Checkpoint] | None = None) -> list[float]:
        """The weights of ``models`` (default: every merged model, in order), one number each,
        for ``what`` (a step that weighs a whole model; a weight that varies by tensor is for
        the data-free merges, and validate refuses it)."""
        models = self.models if models is None else models
        for checkpoint in models:
            if checkpoint.spec.varies:
                raise MergeCliError(
                    f"checkpoints.{checkpoint.index}.weight varies by tensor, which only the "
                    f"data-free merge methods take; {what} weighs each model with one number: "
                    "give one"
                )
        return [float(c.spec.weight) for c in models]

    @property
    def models(self) -> list[Checkpoint]:
        """The checkpoints being merged: every one but the base model."""
        return [c for c in self.checkpoints if c.spec.role != "base"]

    def build_module(self, device: torch.device | None = None) -> nn.Module:
        """A fresh module of the recipe's architecture, on the run's device (or ``device``)."""
        from mergecli.models import build_model
        from mergecli.models.hf import model_directory

        if self.model_spec is None:
            raise MergeCliError(
                f"{self.loaded.source}: this step needs `model: {{arch: ..., args: ...}}`, and the "
                "checkpoints do not say which architecture they are (not written by mergecli)"
            )
        spec, folder = self.model_spec, model_directory(self.reference.spec.path)
        return build_model(spec.arch, spec.args, model_dir=folder).to(device or self.device)

    def data(self, split: Literal["fit", "eval"]) -> Any:
        """The recipe's ``data.fit`` or ``data.eval``, loaded once and checked against the model
        (every step that runs the model on data gets it here). A step that reads one eval set
        refuses a recipe with several (`eval_sets` gives them all)."""
        if split == "eval":
            specs = self.loaded.recipe.data.eval_specs()
            if len(specs) > 1:  # the pipeline's prefix names the step
                raise MergeCliError(
                    f"data.eval: this step reads one eval set, the recipe names {len(specs)} "
                    f"({', '.join(specs)}); give data.eval one set for it"
                )
            return self._load("eval", next(iter(specs.values()), None), "data.eval")
        return self._load("fit", self.loaded.recipe.data.fit, "data.fit")

    def eval_sets(self) -> dict[str, Any]:
        """Every set of ``data.eval`` by name, loaded and checked (one unnamed set: ``eval``)."""
        specs = self.loaded.recipe.data.eval_specs()
        if not specs:
            raise MergeCliError(f"{self.loaded.source}: this step needs data.eval")
        if not isinstance(self.loaded.recipe.data.eval, dict):
            return {"eval": self.data("eval")}
        return {
            name: self._load(f"eval.{name}", spec, f"data.eval.{name}")
            for name, spec in specs.items()
        }

    def _load(self, key: str, spec: Any, where: str) -> Any:
        """Load the data ``spec`` once (by ``key``) and check it against the model."""
        from mergecli.data import load_data
        from mergecli.data.text import with_default_tokenizer

        if key not in self._data:
            if spec is None:
                raise MergeCliError(f"{self.loaded.source}: this step needs {where}")
            raw = spec.model_dump(exclude_none=True, exclude={"batch_size"})
            raw = with_default_tokenizer(raw, self.reference.spec.path)
            data = load_data(raw, seed=self.loaded.recipe.seed, where=where)
            self._check_against_model(data, raw, where)
            self._data[key] = data
        return self._data[key]

    def _check_against_model(self, data: TensorData, raw: Mapping[str, Any], where: str) -> None:
        """Inputs the model cannot take or labels it has no output for fail here, in one line,
        rather than deep in a step. Without a model spec the step itself says it needs one."""
        from mergecli.data.model_check import DataUse, check_against_model
        from mergecli.data.sources import describe_source
        from mergecli.models import argument_names

        if self.model_spec is None:
            return
        spec = self.model_spec
        names = argument_names(spec.arch)
        use = DataUse(where, describe_source(raw), spec.arch, spec.input_shape, names)
        check_against_model(data, self.build_module(), use)

    def example_input(self) -> Tensor:
        """A small input batch for tracing: from ``model.input_shape``, else from the data."""
        spec = self.model_spec
        if spec is not None and spec.input_shape:
            generator = torch.Generator().manual_seed(self.loaded.recipe.seed)
            return torch.randn(2, *spec.input_shape, generator=generator)
        if self.loaded.recipe.data.fit is not None:
            return self.data("fit").features(slice(0, 2)).clone()
        if self.loaded.recipe.data.eval is not None:
            return next(iter(self.eval_sets().values())).features(slice(0, 2)).clone()
        if spec is not None and spec.arch == "hf":  # models.hf.HF_ARCH, imported when needed
            from mergecli.models.hf import example_input

            made_up = example_input(self.build_module(), self.loaded.recipe.seed)
            if made_up is not None:
                return made_up
        raise MergeCliError(
            f"{self.loaded.source}: tracing the model needs an example input; add "
            "`model: {input_shape: [C, H, W]}` or a `data:` section"
        )

    def batch_size(self, split: Literal["fit", "eval"]) -> int:
        """The batch size of data.fit or of data.eval (its one set)."""
        data = self.loaded.recipe.data
        spec = data.fit if split == "fit" else next(iter(data.eval_specs().values()))
        return spec.batch_size

    def eval_batch_size(self, name: str) -> int:
        """The batch size of the eval set ``name`` (as `eval_sets` names them)."""
        return self.loaded.recipe.data.eval_specs()[name].batch_size
