"""Model Stock: the average of the fine-tunes pulled toward the base by their angle."""

from __future__ import annotations

import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.pieces import in_pieces
from mergecli.merge.step import merge_method

# Entries per block of a flat dot product: float32 rounding stays that of one block's terms.
_BLOCK = 1 << 16
# Entries per piece of the streamed form: a few MB in float32, which stay in the cache.
_PIECE = 1 << 20


def two_fine_tunes(n: int, has_base: bool) -> str | None:
    """Model Stock's angle needs two offsets from the base (a recipe without one is told so by
    the base check)."""
    if not has_base or n >= 2:
        return None
    return (
        f"merge model_stock: needs a base and at least two fine-tuned checkpoints, got {n} "
        "besides the base; add another fine-tune of the base or use task_arithmetic"
    )


@merge_method("model_stock", needs_base=True, model_count=two_fine_tunes)
def model_stock(models: Tensor, weights: Tensor, base: Tensor, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al., 2024): t w_avg + (1 - t) w_0, t = N cos / (1 + (N - 1) cos).

    cos is the mean cosine of the angles between the N fine-tunes' offsets from the base w_0,
    over all pairs, of each tensor taken as one vector (``filter_wise``: of each row, i.e. along
    the last dimension, as mergekit 0.1.5 does). Where 1 + (N - 1) cos vanishes (|.| < 1e-6)
    there is no finite t and the base is kept, as in mergekit. The checkpoints' weights play
    no part: the paper and mergekit average the fine-tunes uniformly.
    """
    n = len(models)
    if problem := two_fine_tunes(n, True):
        raise MergeCliError(problem)
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = models.reshape(n, *w0.shape)
    else:
        w0 = base.reshape(-1)
        ws = models.reshape(n, -1)
    offsets = ws.sub_(w0)  # in place: the engine hands each method a fresh stack
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = _row_dots(offsets[i], offsets[j]) if filter_wise else _dot(offsets[i], offsets[j])
            cosines.append(_cosine(dot, norms[i], norms[j]))
    t = _ratio(torch.stack(cosines).mean(dim=0).unsqueeze(-1), n)
    return _interpolate(offsets, t, w0).reshape(shape)


def _cosine(dot: Tensor, norm_a: Tensor, norm_b: Tensor) -> Tensor:
    # A zero offset would divide by 0; mergekit clamps the norms' product at 1e-6.
    return (dot / (norm_a * norm_b).clamp(min=1e-6)).clamp(-1, 1)


def _ratio(cos: Tensor, n: int) -> Tensor:
    """t = N cos / (1 + (N - 1) cos); 0 (the base) where the denominator vanishes."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


def _interpolate(offsets: Tensor, t: Tensor, w0: Tensor) -> Tensor:
    """t w_avg + (1 - t) w_0, written as w_0 + t (w_avg - w_0), in place in the first offset."""
    total = offsets[0]
    for offset in offsets[1:]:
        total.add_(offset)
    return total.div_(len(offsets)).mul_(t).add_(w0)


def model_stock_streamed(
    models: list[Tensor],
    weights: Tensor,
    base: Tensor,
    out: Tensor,
    compute_dtype: torch.dtype,
    filter_wise: bool = False,
    workers: int = 1,
) -> Tensor | None:
    """`model_stock` of the inputs as stored, into ``out``, a piece of ``_PIECE`` entries at a
    time: each input is read twice (the cosines, then the interpolation) in pieces that stay
    in the cache, where the whole-tensor form makes about ten passes over float32 copies. The
    same math in ``compute_dtype``; dots and norms summed in float64 across pieces, in piece
    order, so ``workers`` threads taking pieces in turn give the same bits as one. None where
    it does not apply (``filter_wise``)."""
    if filter_wise:
        return None
    n = len(models)
    if problem := two_fine_tunes(n, True):
        raise MergeCliError(problem)
    w0, ws, flat = base.reshape(-1), [m.reshape(-1) for m in models], out.view(-1)
    size = w0.numel()
    count = -(-size // _PIECE)
    workers = max(1, min(workers, count))
    scratch = [torch.empty((n + 1, min(size, _PIECE)), dtype=compute_dtype) for _ in range(workers)]
    grams = [torch.zeros(n, n, dtype=torch.float64)] * count

    def cosines(piece: int, worker: int) -> None:
        grams[piece] = _gram(_offsets(ws, w0, piece * _PIECE, scratch[worker]))

    in_pieces(count, cosines, workers)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for part in grams:
        gram += part
    norms = gram.diagonal().sqrt()
    pairs = [_cosine(gram[i, j], norms[i], norms[j]) for i in range(n) for j in range(i + 1, n)]
    t = float(_ratio(torch.stack(pairs).mean().to(compute_dtype), n))

    # t w_avg + (1 - t) w_0 as (1 - t) w_0 + (t / N) sum w_i: each input read once more.
    def interpolate(piece: int, worker: int) -> None:
        start = piece * _PIECE
        stop = min(start + _PIECE, size)
        mixed = scratch[worker][0, : stop - start].copy_(w0[start:stop]).mul_(1 - t)
        for w in ws:
            mixed.add_(w[start:stop], alpha=t / n)
        flat[start:stop].copy_(mixed)

    in_pieces(count, interpolate, workers)
    return out


def _gram(offsets: Tensor) -> Tensor:
    """All pairwise dot products of the rows of ``offsets`` (N, C), in float64: one batched
    N×N product per block of ``_BLOCK`` entries, the blocks summed in float64 (one pass over
    the rows, where a dot per pair reads each row N times)."""
    n, c = offsets.shape
    whole = c // _BLOCK * _BLOCK
    blocks = offsets[:, :whole].reshape(n, -1, _BLOCK).transpose(0, 1)
    gram = torch.bmm(blocks, blocks.transpose(1, 2)).double().sum(dim=0)
    rest = offsets[:, whole:]
    return gram + (rest @ rest.T).double()


def _offsets(models: list[Tensor], base: Tensor, start: int, scratch: Tensor) -> Tensor:
    """The models' offsets from the base, entries [start, start + piece), in ``scratch``'s
    rows 0..N-1 (row N holds the base's piece) and dtype."""
    stop = min(start + scratch.shape[1], base.numel())
    piece = scratch[:, : stop - start]
    w0 = piece[-1].copy_(base[start:stop])
    for row, model in zip(piece[:-1], models, strict=True):
        row.copy_(model[start:stop]).sub_(w0)
    return piece[:-1]


model_stock.streamed = model_stock_streamed  # the merge engine's form for inputs read from files


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """The dot product of two flat tensors without their entrywise product (a copy of a
    tensor): one `torch.dot` per block of ``_BLOCK`` entries (a vectorised kernel, three times
    faster than a batched product of 1×4096 blocks), the blocks' dots summed in float64, so
    that rounding does not grow with the tensor's size."""
    dots = [torch.dot(a[i : i + _BLOCK], b[i : i + _BLOCK]) for i in range(0, a.numel(), _BLOCK)]
    total = torch.stack(dots).double().sum() if dots else a.new_zeros((), dtype=torch.float64)
    return total.to(a.dtype)


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """Dot products along the last dimension as batched 1×C by C×1 products (no entrywise
    product held); a scalar's is its product."""
    if a.dim() < 2:
        return (a * b).sum(dim=-1)
    c = a.shape[-1]
    products = torch.bmm(a.reshape(-1, 1, c), b.reshape(-1, c, 1))
    return products.reshape(a.shape[:-1])
