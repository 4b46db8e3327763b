"""The fit's stacked models sharded over the job's processes with PyTorch FSDP2 (``fully_shard``;
Zhao et al., 2023, "PyTorch FSDP"), for models whose stacked copies do not fit one device.

Each merged parameter of the module becomes a parametrization (``torch.nn.utils.parametrize``)
that computes it from a frozen stack of its copies and its slice of the fit's coefficients, as
``merged_weights`` does for the whole model at once. The stacks are flattened, so that FSDP
splits each one evenly over any number of ranks (a stack's first axis is only N long), and
sharded block by block: a block's stacks are gathered for its forward and again for its
backward, then freed.

The coefficients are not FSDP's. They stay one tensor, the same on every rank, whose gradient
the fit all-reduces as it does unsharded: the optimizer, the saved fit state and resuming are
those of an unsharded fit, and a state saved by one can resume the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mergecli.data import TensorData, TokenBatch
from mergecli.data.batches import share
from mergecli.errors import MergeCliError
from mergecli.fit.coefficients import Granularity, rows_of
from mergecli.models.forward import model_logits
from mergecli.runtime.distributed import World

MergeFn = Callable[[Tensor, Tensor], Tensor]  # (a tensor's stack (N, *shape), its coefficients)


class MergedTensor(nn.Module):
    """One merged parameter: ``merge(stack, coefficients)``, the stack a frozen flat parameter
    (what FSDP shards) and the coefficients read from the fit's one tensor at every call."""

    def __init__(
        self, stack: Tensor, shape: torch.Size, coefficients: Callable[[], Tensor], merge: MergeFn
    ) -> None:
        super().__init__()
        self.stack = nn.Parameter(stack.reshape(-1), requires_grad=False)
        self.stacked_shape = (stack.shape[0], *shape)
        self.coefficients = coefficients
        self.merge = merge

    def forward(self, _placeholder: Tensor) -> Tensor:
        return self.merge(self.stack.view(self.stacked_shape), self.coefficients())


@dataclass(frozen=True)
class Slot:
    """Where a tensor's coefficients are in the last axis of the fit's logits."""

    offset: int
    count: int
    shape: torch.Size


def slots(names: list[str], shapes: list[torch.Size], granularity: Granularity) -> list[Slot]:
    """Each tensor's coefficients, in the order and layout ``FlatParameters`` gives them."""
    result, offset = [], 0
    for shape in shapes:
        if granularity == "parameter":
            count = shape.numel()
        elif granularity == "row":
            count = rows_of(shape)
        else:
            count = 1
        result.append(Slot(offset if granularity != "model" else 0, count, shape))
        if granularity != "model":
            offset += count
    return result


def coefficient_view(logits: Tensor, slot: Slot, granularity: Granularity) -> Tensor:
    """A tensor's coefficients from the fit's logits (..., G), shaped to broadcast over it."""
    lead = logits.shape[:-1]
    part = logits[..., slot.offset : slot.offset + slot.count]
    dims = len(slot.shape)
    if granularity == "parameter":
        return part.reshape(*lead, *slot.shape)
    if granularity == "row" and dims:
        return part.reshape(*lead, slot.count, *[1] * (dims - 1))
    return part.reshape(*lead, *[1] * dims)


class ShardedStack:
    """The module with its merged parameters computed from stacks sharded over the ranks; the
    coefficients it reads are ``self.logits``, which the fit sets (``using``)."""

    def __init__(
        self,
        module: nn.Module,
        sources: list[Mapping[str, Tensor]],
        names: list[str],
        granularity: Granularity,
        merge: MergeFn,
        dtype: torch.dtype,
        device: torch.device,
        world: World,
        buffers: Mapping[str, Tensor],
    ) -> None:
        self.module, self.granularity, self.world = module, granularity, world
        self.logits: Tensor | None = None
        self.idle_input: Tensor | TokenBatch | None = None
        _buffers_to(module, device)
        shapes = [sources[0][n].shape for n in names]
        where = dict(zip(names, slots(names, shapes, granularity), strict=True))
        owners = _owners(module, set(names))
        # The reference's copies of tied parameters (an output layer tied to the embeddings)
        aliases = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        mesh = _mesh(device, world) if world.distributed else None
        for block in _blocks(module):
            self._parametrize(block, owners, where, sources, merge, dtype, device)
            if mesh is not None:
                _fully_shard(block, mesh)
        self._parametrize(module, owners, where, sources, merge, dtype, device)
        if mesh is not None:
            _fully_shard(module, mesh)
        _load_buffers(module, {n: t for n, t in buffers.items() if n not in aliases}, device)

    def _parametrize(self, within, owners, where, sources, merge, dtype, device) -> None:
        """Give every merged parameter inside ``within`` not yet given one its parametrization
        (tied parameters share one, and so one stack)."""
        for name in [n for n in owners if _inside(within, owners[n][0][0])]:
            places = owners.pop(name)
            slot = where[name]
            stack = torch.stack([s[name].to(device, dtype) for s in sources])
            merged = MergedTensor(stack, slot.shape, self._coefficients(slot), merge)
            for owner, attribute in places:
                _replace(owner, attribute, merged)

    def _coefficients(self, slot: Slot) -> Callable[[], Tensor]:
        def coefficients() -> Tensor:
            if self.logits is None:
                raise RuntimeError("the sharded module runs with coefficients set (using)")
            return coefficient_view(self.logits, slot, self.granularity)

        return coefficients

    def stack_bytes(self) -> tuple[int, int]:
        """The stacks' bytes held on this rank, and in all (what sharding divides)."""
        held = total = 0
        for parameter in self.module.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            held += local.numel() * local.element_size()
            total += parameter.numel() * parameter.element_size()
        return held, total

    @contextmanager
    def using(self, logits: Tensor) -> Iterator[None]:
        """The module computes its parameters from ``logits`` inside the context."""
        previous, self.logits = self.logits, logits
        try:
            yield
        finally:
            self.logits = previous

    def idle_on(self, data: TensorData, device: torch.device) -> None:
        """Keep one example of ``data`` for ``idle_loss``."""
        self.idle_input = next(data.take(slice(0, 1)).batches(1, device=device))[0]

    def idle_loss(self) -> Tensor:
        """A zero that has been through the module: what a rank whose share of a batch is empty
        computes, since FSDP gathers every block's stacks from all the ranks at once."""
        if self.idle_input is None:
            raise RuntimeError("idle_loss needs an example (idle_on)")
        return model_logits(self.module, self.idle_input).sum() * 0.0


def lockstep_shares(
    data: TensorData, batch_size: int, world: World, device: torch.device
) -> Iterator[tuple[Tensor | TokenBatch, Tensor] | None]:
    """This rank's share ``(x, y)`` of every batch of ``data`` in order, or None where its share
    is empty (a batch smaller than the world): every rank counts the same batches, so that a
    sharded module is called as often on each."""
    for start in range(0, len(data), batch_size):
        first, last = share(start, min(start + batch_size, len(data)), world.rank, world.size)
        if first == last:
            yield None
            continue
        yield next(data.take(slice(first, last)).batches(last - first, device=device))


def _owners(module: nn.Module, names: set[str]) -> dict[str, list[tuple[nn.Module, str]]]:
    """Each merged parameter's (module, attribute) places, tied ones under their first name."""
    first: dict[int, str] = {}
    places: dict[str, list[tuple[nn.Module, str]]] = {}
    for full_name, parameter in module.named_parameters(remove_duplicate=False):
        name = first.setdefault(id(parameter), full_name)
        if name not in names:
            continue
        owner_name, _, attribute = full_name.rpartition(".")
        places.setdefault(name, []).append((module.get_submodule(owner_name), attribute))
    return places


def _replace(owner: nn.Module, attribute: str, merged: MergedTensor) -> None:
    """The parameter becomes the parametrization's output; what parametrize keeps as the
    original is an empty buffer, so that no copy of the model stays beside the stacks."""
    del owner._parameters[attribute]
    owner.register_buffer(attribute, torch.empty(0), persistent=False)
    parametrize.register_parametrization(owner, attribute, merged, unsafe=True)


def _inside(within: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in within.modules())


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The units FSDP gathers one at a time: the members of the module's ModuleLists (a
    transformer's layers), innermost first (FSDP shards children before their parents)."""
    depth = {id(m): name.count(".") for name, m in module.named_modules()}
    members = [b for m in module.modules() if isinstance(m, nn.ModuleList) for b in m]
    return sorted(members, key=lambda b: -depth[id(b)])


def _mesh(device: torch.device, world: World):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world.size,))


def _fully_shard(module: nn.Module, mesh) -> None:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4 and 2.5 kept it here
        from torch.distributed._composable.fsdp import fully_shard
    fully_shard(module, mesh=mesh)


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                owner._buffers[name] = buffer.to(device)


def _load_buffers(module: nn.Module, buffers: Mapping[str, Tensor], device: torch.device) -> None:
    """The tensors that are not merged (BatchNorm statistics, rotary frequencies) from the
    reference, as the unsharded fit passes them."""
    own = dict(module.named_buffers())
    for name, tensor in buffers.items():
        if name not in own:
            raise MergeCliError(f"fit: the model has no buffer '{name}' for the reference's tensor")
        with torch.no_grad():
            own[name].copy_(tensor.to(device))
