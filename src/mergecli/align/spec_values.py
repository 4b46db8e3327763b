"""What the spec tracer follows through a graph: unit elements, and where tensors hold them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import fx

# --- union-find over unit elements ------------------------------------------------------------


class Units:
    """Union-find over unit blocks; element 0 is FIXED (never permuted)."""

    FIXED = 0

    def __init__(self) -> None:
        self.parent = [0]
        self.size = [0]

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.FIXED not in (ra, rb) and self.size[ra] != self.size[rb]:
            raise Unhandled(f"joins {self.size[ra]} units with {self.size[rb]}")
        if rb == self.FIXED:  # FIXED stays the root so that "is fixed" is one lookup
            ra, rb = rb, ra
        self.parent[rb] = ra


class Unhandled(Exception):
    """Raised inside a rule: the node's tensors are fixed, with this reason."""


@dataclass
class Feature:
    """Which axis of a tensor carries units, as consecutive blocks of unit elements."""

    axis: int
    blocks: list[tuple[int, int]]  # (element, length)
    inner: int = 1  # entries per unit along the axis: >1 once flattened with positions

    @property
    def length(self) -> int:
        return sum(n for _, n in self.blocks)

    @property
    def entries(self) -> int:
        return self.length * self.inner

    def at(self, axis: int) -> Feature:
        return Feature(axis, self.blocks, self.inner)


@dataclass
class ParamValue:
    """A parameter used directly in the graph (get_attr), e.g. a class token or position table."""

    name: str
    shape: tuple[int, ...]


FIXED_TENSOR = "fixed"  # a tensor none of whose axes may be permuted (inputs, unknown ops)


@dataclass(frozen=True)
class Heads:
    """A tensor whose units were split into attention heads: ``head_axis`` indexes heads,
    ``dim_axis`` each head's dimensions (``element``'s units are heads-major).

    ``repeat``: each head appears that many times in a row along ``head_axis`` (grouped-query
    attention's key/value heads repeated for their query heads); ``broadcast``: the size of an
    axis just after ``head_axis`` that an ``expand`` made, which a reshape then folds into the
    heads. ``dims_fixed``: something mixes or scales the dimensions within a head (rotary
    embeddings), so they may not move. ``folded``: the batch is folded into the head axis
    (``nn.MultiheadAttention``'s (T, B * heads, dims) layout) until a reshape unfolds it.
    """

    element: int
    head_axis: int
    dim_axis: int
    heads: int
    dims: int
    repeat: int = 1
    broadcast: int = 1
    dims_fixed: bool = False
    folded: int = 1  # the head axis holds (batch, heads) folded into one, batch major

    def moved(self, head_axis: int, dim_axis: int) -> Heads:
        return replace(self, head_axis=head_axis, dim_axis=dim_axis)


@dataclass(frozen=True)
class Packed:
    """Units split into (pieces, heads, dims): a fused query/key/value projection, whose
    pieces become heads of their own when one is selected."""

    element: int
    piece_axis: int
    head_axis: int
    dim_axis: int
    pieces: int
    heads: int
    dims: int


@dataclass(frozen=True)
class Scores:
    """Attention scores q k^T of query and key heads (eager attention, before the values);
    ``key`` laid out as the query's, dimensions last, as scaled dot-product attention takes it."""

    query: Heads
    key: Heads
    head_axis: int


@dataclass
class AttentionRecord:
    """One scaled dot-product attention over heads: its elements and sizes."""

    node: fx.Node
    query: int
    key: int
    value: int
    output: int
    heads: int
    kv_heads: int
    qk_dims: int
    v_dims: int
    qk_dims_fixed: bool
