"""The `mergecli` command line. Heavy modules (torch, pydantic) are imported inside commands
so that `mergecli --help` starts instantly."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional  # noqa: UP035 - typer needs Optional at runtime

import typer

from mergecli import __version__

app = typer.Typer(
    name="mergecli",
    help="Merge neural networks from YAML recipes: align, learn coefficients, repair, evaluate.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class LogChoice(str, Enum):
    auto = "auto"
    rich = "rich"
    plain = "plain"
    json = "json"


@dataclass
class Settings:
    log: str = "auto"
    debug: bool = False
    log_every: float = 10.0


SETTINGS = Settings()


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mergecli {__version__}")
        raise typer.Exit()


LOG_HELP = "How to print progress: rich on a terminal, plain lines or JSON (one object a line)."
DEBUG_HELP = "Show tracebacks for errors (in a `traceback` field with --log json)."
LOG_EVERY_HELP = "Seconds between progress lines (plain and json logs): step, loss, throughput."


@app.callback()
def options(
    # The environment variables serve launchers that read options themselves (torchrun takes
    # --log for its --log-dir) and job scripts that set them once.
    log: Annotated[LogChoice, typer.Option(envvar="MERGECLI_LOG", help=LOG_HELP)] = LogChoice.auto,
    debug: Annotated[bool, typer.Option(help=DEBUG_HELP)] = False,
    log_every: Annotated[
        float, typer.Option(min=0.0, envvar="MERGECLI_LOG_EVERY", help=LOG_EVERY_HELP)
    ] = 10.0,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Global options."""
    SETTINGS.log = log.value
    SETTINGS.debug = debug
    SETTINGS.log_every = log_every


# The global options are accepted after the command too (`mergecli run r.yaml --log plain`):
# every command gets them, and a value given there wins over one given before the command.
COMMAND_OPTIONS = [
    inspect.Parameter(
        "log",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[LogChoice], typer.Option(help=LOG_HELP)],  # noqa: UP045
    ),
    inspect.Parameter(
        "log_every",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Optional[float],  # noqa: UP045
            typer.Option(min=0.0, help=LOG_EVERY_HELP),
        ],
    ),
    inspect.Parameter(
        "debug",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Optional[bool],  # noqa: UP045
            typer.Option("--debug/--no-debug", help=DEBUG_HELP, show_default=False),
        ],
    ),
]


def command(name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``app.command`` whose command also takes the global options (--log, --log-every,
    --debug) after its name."""

    def register(function: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(function, eval_str=True)

        @functools.wraps(function)
        def with_options(*args: Any, log=None, log_every=None, debug=None, **kwargs: Any) -> None:  # noqa: ANN001
            if log is not None:
                SETTINGS.log = log.value
            if log_every is not None:
                SETTINGS.log_every = log_every
            if debug is not None:
                SETTINGS.debug = debug
            function(*args, **kwargs)

        params = [*signature.parameters.values(), *COMMAND_OPTIONS]
        with_options.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return app.command(name)(with_options)

    return register


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a user mistake as its one-line message and exit non-zero; --debug re-raises (with
    --log json: the traceback goes in the error's JSON object)."""
    from mergecli.errors import MergeCliError

    try:
        yield
    except MergeCliError as exc:
        if SETTINGS.debug and SETTINGS.log != "json":
            raise
        _print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if SETTINGS.log == "json":
            _error_line("interrupted", exit_code=130)
        else:
            typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if SETTINGS.debug and SETTINGS.log != "json":
            raise
        message = (
            f"internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback and report it)"
        )
        if SETTINGS.log == "json":
            _error_line(message, exit_code=70)
        else:
            typer.echo(message, err=True)
        raise typer.Exit(70) from None


def _print_error(exc) -> None:  # noqa: ANN001 - MergeCliError, imported lazily
    """A user mistake: one line per problem, as text or (--log json) as JSON objects."""
    from mergecli.errors import Problem, RecipeError

    if SETTINGS.log == "json":
        problems = exc.problems if isinstance(exc, RecipeError) else [str(exc)]
        for problem in problems:
            fields = problem.fields() if isinstance(problem, Problem) else {"message": problem}
            _error_line(exit_code=exc.exit_code, **fields)
        return
    prefix = "" if isinstance(exc, RecipeError) else "error: " + _rank_tag()
    for line in str(exc).splitlines():
        typer.echo(f"{prefix}{line}", err=True)


def _error_line(message: str, exit_code: int, **fields: Any) -> None:
    """An error as one JSON object on stderr; with --debug it carries the traceback."""
    import traceback

    from mergecli.runtime.log import json_line

    if SETTINGS.debug:
        fields["traceback"] = traceback.format_exc()
    rank, size = _rank()
    json_line("error", message, rank, size, exit_code=exit_code, **fields)


def _rank() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 when never started)."""
    if "mergecli.runtime.distributed" not in sys.modules:  # never started: one process
        return 0, 1
    from mergecli.runtime.distributed import current

    world = current()
    return (world.rank, world.size) if world.distributed else (0, 1)


def _rank_tag() -> str:
    """Several processes share one job log: an error says which one failed."""
    rank, size = _rank()
    return f"[rank {rank}/{size}] " if size > 1 else ""


def _log(rank: int = 0, world: int = 1):
    from mergecli.runtime.log import Log, capture_warnings

    log = Log(SETTINGS.log, rank, world, SETTINGS.log_every)  # type: ignore[arg-type]
    capture_warnings(log)
    return log


def _recipe_warnings(loaded, log) -> None:
    """Log what loading the recipe warned about (deprecated keys), once: on rank 0."""
    if log.main:
        for warning in loaded.warnings:
            log.warn(warning)


RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.")]
SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--set", help="Override a recipe key: --set steps.0.fit.lr=0.01 (repeatable)."),
]


OutArg = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Argument(
        help="The output dir, as mergekit-yaml takes it (the same as --out).", show_default=False
    ),
]
OutOption = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--out",
        help="The output dir (replaces the recipe's output.dir; a mergekit config names none: "
        "without it, CONFIG_STEM-merged beside the config).",
    ),
]


def _output_dir(positional: Path | None, option: Path | None) -> str | None:
    """The output dir given on the command line, positionally (as mergekit-yaml) or --out."""
    from mergecli.errors import Problem, RecipeError

    if positional is not None and option is not None and positional != option:
        raise RecipeError(
            [Problem("give the output dir once: as the second argument or with --out")]
        )
    chosen = positional or option
    return None if chosen is None else str(chosen)


class Resume(str, Enum):
    auto = "auto"
    never = "never"


@command()
def run(
    recipe: RecipeArg,
    out_dir: OutArg = None,
    set_: SetOption = None,
    out: OutOption = None,
    resume: Annotated[
        Resume,
        typer.Option(
            help="auto: continue an interrupted fit from output.dir/.state; never: start over."
        ),
    ] = Resume.auto,
    requeue: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--requeue/--no-requeue",
            help="Inside a SLURM job, requeue it after a stop signal has saved the fit "
            "(default: the recipe's slurm.requeue).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace an output dir that holds files mergecli did not write (never one "
            "that holds an input)."
        ),
    ] = False,
) -> None:
    """Run a recipe: load, align, merge or fit, repair, evaluate, and write the output dir.
    A mergekit config (a top-level `merge_method:`) runs as it is: `mergecli run config.yml
    OUT_DIR`, as with mergekit-yaml.

    SIGTERM, SIGUSR1 and SIGINT stop the run: a fit saves its state after the step it is in
    and the next run resumes it. Under torchrun or srun, each process takes one device.
    """
    with user_errors():
        _prefetch_digests(recipe, set_ or [], _output_dir(out_dir, out))
        from mergecli.pipeline import run_recipe
        from mergecli.recipe import load_recipe
        from mergecli.runtime import distributed
        from mergecli.runtime.signals import STOP, Stopped, signal_name

        log, main, wants_requeue = _log(), True, bool(requeue)
        with STOP.installed():
            try:
                loaded = load_recipe(recipe, set_ or [], out=_output_dir(out_dir, out))
                slurm = loaded.recipe.slurm
                wants_requeue = requeue if requeue is not None else bool(slurm and slurm.requeue)
                world = distributed.start(loaded.recipe.device)
                main = world.is_main
                try:
                    log = _log(world.rank, world.size)
                    _recipe_warnings(loaded, log)
                    if world.distributed:
                        log.info(
                            f"rank {world.rank} of {world.size} ({world.launcher}, "
                            f"{world.backend}) on {world.device}",
                            every_rank=True,
                        )
                    log.info(
                        f"recipe {loaded.recipe.name}: {len(loaded.steps)} step(s) -> "
                        f"{loaded.output_dir}"
                    )
                    run_recipe(loaded, log, resume=resume is Resume.auto, overwrite=overwrite)
                    distributed.stop(wait=True)
                finally:
                    distributed.stop()
            except Stopped as stop:
                log.info(_stop_line(stop, wants_requeue and main), every_rank=True)
                raise typer.Exit(stop.exit_code) from None
            if STOP.pending() is not None:
                log.info(
                    f"received {signal_name(STOP.pending())} after the output was complete; "
                    "the run finished"
                )


def _prefetch_digests(recipe: Path, overrides: list[str], out: str | None) -> None:
    """Start hashing the recipe's checkpoints (for the report) before torch loads: the second
    of a run's first second that torch's import leaves a core idle. Only a head start: a
    recipe that does not read is reported by `load_recipe`, and the run hashes what it needs."""
    from mergecli.errors import MergeCliError
    from mergecli.io.digest import prefetch_sha256
    from mergecli.recipe.load import read_recipe

    try:
        data, _ = read_recipe(Path(recipe), overrides, out)
    except MergeCliError:
        return
    checkpoints = data.get("checkpoints")
    entries = checkpoints if isinstance(checkpoints, list) else []
    prefetch_sha256(
        [c["path"] for c in entries if isinstance(c, dict) and isinstance(c.get("path"), str)]
    )


def _stop_line(stop, requeue: bool, kept: str = "fit state") -> str:
    """The one line a stopped run logs: why, where, what was kept, whether the job requeued.
    ``requeue`` is false on ranks other than 0: a job is requeued once."""
    import signal

    from mergecli.runtime import slurm
    from mergecli.runtime.signals import signal_name

    parts = [f"stopped by {signal_name(stop.signum)} {stop.detail}".rstrip()]
    if stop.saved is not None:
        parts.append(f"{kept} saved in {stop.saved}; run the same command to resume")
    else:
        parts.append("no output written; run the same command to start again")
    # Never after Ctrl-C: a person stopped the run and wants it stopped.
    if requeue and stop.signum != signal.SIGINT:
        job = slurm.job_id()
        if job is None:
            parts.append("not requeued: not inside a SLURM job")
        else:
            problem = slurm.requeue(job)
            parts.append(f"SLURM job {job} requeued" if problem is None else problem)
    parts.append(f"exit {stop.exit_code}")
    return "; ".join(parts)


@command()
def convert(recipe: RecipeArg, out: OutOption = None) -> None:
    """Print the mergecli recipe equivalent to a mergekit config (checked as `run` checks it
    before reading any model)."""
    with user_errors():
        from mergecli.errors import Problem, RecipeError
        from mergecli.recipe import validate_recipe
        from mergecli.recipe.load import read_recipe
        from mergecli.recipe.mergekit import MergekitLocator, to_yaml

        data, where = read_recipe(recipe, out=None if out is None else str(out))
        if not isinstance(where, MergekitLocator):
            raise RecipeError(
                [Problem("not a mergekit config (it has no top-level merge_method)", str(recipe))]
            )
        printed = to_yaml(data)
        validate_recipe(data, where, default_name=recipe.stem)
        typer.echo(f"# mergecli recipe converted from the mergekit config {recipe}")
        typer.echo(printed, nl=False)


@command()
def validate(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Check a recipe and what it names without running it (the checks `run` makes first:
    checkpoint files, pins, tensor shapes against each other and the model, data files and
    shapes); print the resolved recipe."""
    with user_errors():
        from mergecli.preflight import check_inputs
        from mergecli.recipe import load_recipe

        loaded = load_recipe(recipe, set_ or [])
        _recipe_warnings(loaded, _log())
        checked = check_inputs(loaded)
        typer.echo(f"# {recipe}: valid")
        for line in checked.summary:
            typer.echo(f"# {line}")
        typer.echo(_described_defaults(loaded), nl=False)


def _described_defaults(loaded) -> str:
    """The resolved recipe with, beside each step parameter left unset whose effect no one
    value states (e.g. init per stage), a comment saying what it does."""
    lines = loaded.resolved_yaml().splitlines(keepends=True)
    notes = [s.params.defaults_described(loaded.recipe) for s in loaded.steps]
    step, in_steps = -1, False
    for i, line in enumerate(lines):
        if not line.startswith((" ", "-")):
            in_steps = line.startswith("steps:")
            continue
        if in_steps and line.startswith("- "):
            step += 1
        key, sep, value = line.strip().partition(": ")
        if in_steps and sep and value == "null" and line.startswith("    ") and step >= 0:
            note = notes[step].get(key) if step < len(notes) else None
            if note is not None and line[4] != " ":
                lines[i] = f"{line.rstrip()}  # {note}\n"
    return "".join(lines)


@command("align-spec")
def align_spec(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Show the permutation groups derived from the recipe's model: sizes and tensor axes.
    Before any checkpoint exists (or with none listed), of the recipe's `model:` built afresh."""
    with user_errors():
        from mergecli.align.step import permutation_spec
        from mergecli.pipeline import model_only_state, prepare_state
        from mergecli.recipe import load_recipe
        from mergecli.runtime.log import Column

        log = _log()
        loaded = load_recipe(recipe, set_ or [], needs_checkpoints=False)
        _recipe_warnings(loaded, log)
        specs = loaded.recipe.checkpoints
        if any(Path(c.path).exists() or Path(c.path).is_symlink() for c in specs):
            state = prepare_state(loaded, log, needs_model=True)
        else:
            state = model_only_state(loaded, log)
        spec = permutation_spec(state)
        heads = spec.attention_of()
        tensors = state.reference.tensors
        rows = []
        for group in spec.groups:
            axes = []
            for m in group.members:
                if m.tensor not in tensors:
                    continue  # a tied parameter's other name, not in the checkpoint
                entries = tensors[m.tensor].shape[m.axis]
                start, stop = m.offset * m.inner, (m.offset + m.length) * m.inner
                part = "" if stop - start == entries else f"[{start}:{stop}]"
                runs = f" (runs of {m.inner})" if m.inner > 1 else ""
                axes.append(f"{m.tensor}[{m.axis}]{part}{runs}")
            activation = group.activation
            if group.activation_module is not None:
                side = "input" if group.activation_input else "output"
                activation = f"{group.activation_module} ({side})"
            shape = None
            attention = heads.get(group.name)
            if attention is not None:
                count, dims = _heads_of(attention, group.name)
                shape = f"{count}x{dims}"
            rows.append([group.name, group.size, shape, activation, ", ".join(axes)])
        log.table(
            f"permutation groups of {state.model_spec.arch} ({spec.traced_with} graph, "
            "self-check passed)",
            [
                "group",
                "units",
                Column("heads x dims", key="heads", name=True),
                Column("activation", name=True),
                "tensor[axis]",
            ],
            rows,
        )
        if spec.attention:
            log.table(
                "attention heads (each layer's four groups move as one permutation of heads)",
                ["attention", "heads", "key/value heads", "query/key dims", "value dims"],
                [
                    [
                        a.name,
                        a.heads,
                        a.kv_heads,
                        f"{a.qk_dims} (fixed: rotary)" if a.qk_dims_fixed else a.qk_dims,
                        a.v_dims,
                    ]
                    for a in spec.attention
                ],
            )


def _heads_of(attention, group: str) -> tuple[int, int]:
    """How many heads an attention layer's group holds, and how many units each."""
    a = attention
    if group in (a.key, a.value):
        return a.kv_heads, a.qk_dims if group == a.key else a.v_dims
    return a.heads, a.qk_dims if group == a.query else a.v_dims


@command()
def report(
    output_dir: Annotated[Path, typer.Argument(help="The output dir of a finished `run`.")],
) -> None:
    """Re-render report.md and the analysis plots of an output dir from its report.json."""
    with user_errors():
        from mergecli.io.output_dir import OutputDir, record_files
        from mergecli.report import read_report, render_report

        data = read_report(output_dir / "report.json")
        output = OutputDir(output_dir)
        output.lock_in_place()
        try:
            written = render_report(output_dir, data)
            record_files(output_dir, [p.relative_to(output_dir).as_posix() for p in written])
        finally:
            output.release()
        for path in written:
            _log().info(f"wrote {path}")


@command("inspect")
def inspect_(
    checkpoint: Annotated[str, typer.Argument(help="A safetensors file or checkpoint directory.")],
    other: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(help="A second checkpoint: show the per-tensor difference."),
    ] = None,
) -> None:
    """Show the tensors of a checkpoint (name, shape, dtype, size), or how two differ."""
    with user_errors():
        from mergecli.inspect_checkpoint import inspect_checkpoints

        inspect_checkpoints(checkpoint, other, _log())


@command()
def methods() -> None:
    """List every step method with its parameters and defaults."""
    with user_errors():
        from mergecli.models import builtin_architectures
        from mergecli.registry import all_methods
        from mergecli.runtime.log import Column

        log = _log()
        rows = []
        for method in all_methods():
            params = []
            for field_name, field in method.params.model_fields.items():
                name = field.alias or field_name
                default = _shown_default(field)
                params.append(f"{name}={default}")
            rows.append(
                [
                    method.kind,
                    method.name + (" (default)" if method.default else ""),
                    params,
                    sorted(method.needs),
                    _plain(method.doc),
                ]
            )
        # Names (of methods, parameters, what a method needs) read whole on a narrow terminal;
        # the description wraps.
        # Parameters and needs are lists in the JSON log; people see a parameter a line.
        columns = [
            Column("step", name=True),
            Column("method", name=True),
            Column("parameters", show=lambda v: "\n".join(v) or "-", name=True),
            Column("needs", show=lambda v: ", ".join(v) or "-", name=True),
            "what it does",
        ]
        log.table("step methods", columns, rows)
        log.table(
            "built-in architectures (model.arch)",
            ["arch", "what it is"],
            [
                [name, _plain((fn.__doc__ or "").strip().splitlines()[0])]
                for name, fn in builtin_architectures().items()
            ],
        )


def _plain(doc: str) -> str:
    """A docstring's line as text: RST's ``literal`` marks are for Sphinx, not a terminal."""
    return doc.replace("``", "")


def _shown_default(field) -> str:
    """A parameter's default as `methods` shows it: a value, or in words what an unset
    (None) one does (e.g. the recipe's seed), never a bare None."""
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if default is None and "shown_default" in extra:
        return str(extra["shown_default"])
    return repr(default)


class Optimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    onecycle = "onecycle"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .safetensors file.")],
    arch: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Built-in architecture or package.module:factory (default: mlp, or the --init "
            "checkpoint's).",
            show_default=False,
        ),
    ] = None,
    arg: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--arg", help="Model argument key=value (repeatable), e.g. --arg depth=8."),
    ] = None,
    data: Annotated[
        str,
        typer.Option(help="Training data: SOURCE[:SPLIT] (e.g. mnist:train) or a YAML mapping."),
    ] = "mnist:train",
    eval_data: Annotated[
        str, typer.Option(help="Held-out data, same forms; 'none' to skip.")
    ] = "mnist:test",
    seed: Annotated[int, typer.Option(help="Seed for initialisation and shuffling.")] = 0,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    lr: Annotated[
        float, typer.Option(min=0.0, help="Learning rate (the peak, with a schedule).")
    ] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    optimizer: Annotated[
        Optimizer, typer.Option(help="adam, or sgd with --momentum and --nesterov.")
    ] = Optimizer.adam,
    momentum: Annotated[float, typer.Option(min=0.0, max=1.0, help="SGD's momentum.")] = 0.9,
    nesterov: Annotated[
        bool,
        typer.Option(
            "--nesterov/--no-nesterov", help="SGD with Nesterov momentum (when --momentum > 0)."
        ),
    ] = True,
    weight_decay: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Weight decay on weights (matrices, conv kernels), not on norm layers' "
            "parameters or biases; L2 with sgd, decoupled (AdamW) with adam.",
        ),
    ] = 0.0,
    schedule: Annotated[
        Schedule,
        typer.Option(
            help="Learning rate per step after the warmup: constant; cosine (to 0 at the "
            "end); onecycle (linear up to --lr over the warmup, linear down to 0)."
        ),
    ] = Schedule.constant,
    warmup: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            min=0.0,
            help="Linear warmup from 0 to --lr, in epochs (fractions allowed) [default: 0; "
            "onecycle: 0.3 x --epochs].",
            show_default=False,
        ),
    ] = None,
    label_smoothing: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="Cross-entropy label smoothing.")
    ] = 0.0,
    precision: Annotated[
        Precision,
        typer.Option(
            help="Mixed precision on CUDA: auto (bf16 where the GPU has it), fp32, bf16, fp16 "
            "(with a loss scaler); float32 on the CPU."
        ),
    ] = Precision.auto,
    split: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Train on a share of --data: classes:0-49 (those labels, kept as they are; "
            "--eval-data too) or dirichlet:alpha=0.5:part=0/2[:seed=N] (label-skewed parts, "
            "disjoint for one seed, default 0).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    init: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Start from this checkpoint (fine-tuning) instead of a seeded init; its "
            "architecture and arguments come from its metadata."
        ),
    ] = None,
    resume: Annotated[
        Resume,
        typer.Option(
            help="auto: continue a stopped training from the state beside --out "
            "(NAME.state.safetensors); never: start over."
        ),
    ] = Resume.auto,
) -> None:
    """Train a model on a data source and write a checkpoint that recipes can merge.

    SIGTERM, SIGUSR1 and SIGINT stop it after the batch it is in, with its state saved beside
    --out; the same command then resumes it. --out appears only when training has finished.
    """
    with user_errors():
        import os
        import time
        from dataclasses import asdict

        import torch

        from mergecli.data.partition import describe_partition
        from mergecli.errors import RecipeError
        from mergecli.io import checkpoint_sha256
        from mergecli.runtime.device import resolve_device
        from mergecli.runtime.signals import STOP, Stopped, signal_name
        from mergecli.train import (
            DEFAULT_ARCH,
            INIT_FIX,
            model_for_init,
            save_trained,
            train_model,
        )
        from mergecli.train_regime import Regime
        from mergecli.train_state import TrainCheckpoint, fingerprint, state_path

        if init is not None and os.path.realpath(out) == os.path.realpath(init):
            raise RecipeError(
                [
                    f"--out {out}: is the --init checkpoint, an input that training "
                    "must not replace; write the trained model to another file"
                ]
            )
        log = _log()
        args = _parse_assignments(arg or [], "--arg")
        train_spec = _parse_data_option(data, "--data")
        eval_spec = (
            None if eval_data.lower() == "none" else _parse_data_option(eval_data, "--eval-data")
        )
        if split is not None:
            train_spec, eval_spec = _with_split(split, train_spec, eval_spec)
        init_fix = INIT_FIX
        if init is not None:
            arch, args, init_fix = model_for_init(init, arch, args)
        arch = arch or DEFAULT_ARCH
        regime = Regime(
            optimizer=optimizer.value, lr=lr, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, schedule=schedule.value, warmup=warmup,
            label_smoothing=label_smoothing, precision=precision.value,
        )  # fmt: skip
        options = {
            "arch": arch, "args": args, "data": train_spec, "eval_data": eval_spec,
            "seed": seed, "epochs": epochs, "batch_size": batch_size, **asdict(regime),
            "init": checkpoint_sha256(init) if init is not None else None,
        }  # fmt: skip
        on = resolve_device(device)
        checkpoint = TrainCheckpoint(state_path(out), fingerprint(options))
        with STOP.installed():
            try:
                if resume is Resume.never:
                    checkpoint.remove()
                started = time.perf_counter()
                module, metrics = train_model(
                    arch,
                    args,
                    train_spec,
                    eval_spec,
                    seed=seed,
                    epochs=epochs,
                    batch_size=batch_size,
                    regime=regime,
                    device=on,
                    log=log,
                    init=init,
                    init_fix=init_fix,
                    checkpoint=checkpoint,
                )
                metadata = {"seed": str(seed), "data": train_spec, **metrics}
                # How it was trained, each option as it took effect: `mergecli inspect` shows it.
                metadata["training"] = {
                    "epochs": epochs, "batch_size": batch_size, **regime.described(epochs, on)
                }  # fmt: skip
                if split is not None:
                    metadata["split"] = describe_partition(train_spec["partition"])
                # How long it took (this run, if it resumed), on how many threads: `make
                # figures` quotes training times.
                metadata["train_seconds"] = f"{time.perf_counter() - started:.1f}"
                metadata["threads"] = str(torch.get_num_threads())
                if init is not None:
                    metadata["init"] = str(init)
                if eval_spec is not None:
                    metadata["eval_data"] = eval_spec
                # The checkpoint appears whole, then the state it replaces goes.
                with STOP.deferred():
                    save_trained(module, out, arch, args, metadata)
                    checkpoint.remove()
            except Stopped as stop:
                if stop.saved is None and checkpoint.path.exists():
                    stop.saved = checkpoint.path
                log.info(_stop_line(stop, False, kept="training state"))
                raise typer.Exit(stop.exit_code) from None
        log.info(f"wrote {out}", **{k: round(v, 4) for k, v in metrics.items()})
        if STOP.pending() is not None:
            log.info(
                f"received {signal_name(STOP.pending())} after {out} was written; "
                "the training finished"
            )


def _with_split(
    text: str, train_spec: dict[str, Any], eval_spec: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """--split as the data specs' ``partition``: --data's; a class split also --eval-data's
    (a model of those classes is scored on them), unless that names its own."""
    from mergecli.data.partition import parse_split_option
    from mergecli.errors import MergeCliError, RecipeError

    try:
        partition = parse_split_option(text)
    except MergeCliError as exc:
        raise RecipeError([str(exc)]) from None
    if "partition" in train_spec:
        raise RecipeError(
            [f"--split {text}: --data has a partition already; give the split in one of them"]
        )
    train_spec = {**train_spec, "partition": partition}
    if eval_spec is not None and "classes" in partition and "partition" not in eval_spec:
        eval_spec = {**eval_spec, "partition": partition}
    return train_spec, eval_spec


def _parse_assignments(items: list[str], option: str) -> dict[str, Any]:
    import yaml

    from mergecli.errors import MergeCliError

    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MergeCliError(f"{option} {item}: expected key=value, e.g. {option} depth=8")
        parsed[key] = yaml.safe_load(raw)
    return parsed


def _parse_data_option(text: str, option: str) -> dict[str, Any]:
    """``mnist:train`` or ``{source: tensors, path: d.npz}`` -> a validated data spec."""
    import yaml
    from pydantic import ValidationError

    from mergecli.errors import MergeCliError
    from mergecli.recipe import DataSpec

    if text.lstrip().startswith("{"):
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MergeCliError(f"{option}: not a YAML mapping ({exc})") from None
    else:
        source, _, split = text.partition(":")
        raw = {"source": source, **({"split": split} if split else {})}
    try:
        spec = DataSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if "[" not in str(p))
        raise MergeCliError(f"{option}: {where + ': ' if where else ''}{first['msg']}") from None
    return spec.model_dump(exclude_defaults=True, exclude={"batch_size"})


def main() -> None:
    """Console-script entry point."""
    # Before torch is imported (it reads this once): CPU tensors of 2 MB and more in huge pages.
    # A merge allocates a few tensors the size of a weight matrix per tensor, and the kernel
    # fills huge pages about six times faster than 4 KB ones (PyTorch's own switch; the
    # user's setting, if any, stands).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        code = _main()
    except SystemExit as exit_:
        code = exit_.code
    _exit(code)


def _main() -> int | str | None:
    """Run the command line; its exit status."""
    if _log_mode(sys.argv[1:]) != "json":
        return app(prog_name="mergecli", standalone_mode=True)
    # With --log json a mistake on the command line is a JSON line too.
    try:
        code = app(prog_name="mergecli", standalone_mode=False)
    except typer.TyperException as exc:
        usage = getattr(exc, "ctx", None)
        fields = {"usage": usage.get_usage()} if usage is not None else {}
        _error_line(exc.format_message(), exit_code=exc.exit_code, **fields)
        code = exc.exit_code
    except typer.Abort:
        _error_line("aborted", exit_code=1)
        code = 1
    return code if isinstance(code, int) else 0


def _exit(code: int | str | None) -> None:
    """End the process as Python would, less the teardown of every module's objects: with torch
    loaded that took 0.45-0.58 s of a run on the 2-core VM of bench/RESULTS.md (one tenth of a
    data-free merge), and this process is about to end. Everything a command writes is closed
    (and its outputs fsync'd) before it returns; the atexit handlers still run, and the
    standard streams are flushed. A thread still working (not a daemon) gets the normal exit,
    which waits for it, as does an exit status that is a message."""
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(not t.daemon for t in others) or not (code is None or isinstance(code, int)):
        sys.exit(code)
    import atexit
    import contextlib

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, as Python's exit ignores
            stream.flush()
    os._exit(code or 0)


def _log_mode(args: list[str]) -> str:
    """The --log a command line asks for (the last one given), else $MERGECLI_LOG: known
    before the options are parsed, to print a mistake in them the way the user asked."""
    mode = os.environ.get("MERGECLI_LOG", "auto")
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--log" and i + 1 < len(args):
            mode = args[i + 1]
        elif arg.startswith("--log="):
            mode = arg.removeprefix("--log=")
    return mode
