"""Which elements of a model's parameters a global average's outer step holds (the whole model, or
one fragment of Streaming DiLoCo), and their views in as few tensors as the memory layout allows.

A piece ``(i, start, end)`` is elements ``start:end`` of the i-th parameter (``model.parameters()``
order, flattened row-major; of a sharded parameter, its rank's shard once ``localize``d). ``cut``
gives each of N fragments a contiguous run of pieces of 1/N of the bytes, to the element;
``by_name`` takes fragments named by module. ``Selection`` turns pieces into tensors: when the engine has
packed the parameters into flat buffers (``FlatAverager.pack_``), the pieces of consecutive
parameters that touch in memory become one view of the buffer, so that the outer step of a
fragment (pseudo-gradients, the outer optimizer, the copy back) runs a few ops on one or two flat
tensors instead of a few per parameter. The ops are elementwise, so how the elements are grouped
does not change a bit of the result.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from localsgd.sharding import local, shards

Piece = tuple[int, int, int]  # (parameter index, first element, end element)


def whole(tensors: list[torch.Tensor]) -> list[Piece]:
    """Every tensor whole: the outer step of the whole model."""
    return [(i, 0, t.numel()) for i, t in enumerate(tensors)]


def cut(tensors: list[torch.Tensor], fragments: int) -> list[list[Piece]]:
    """The tensors' elements cut into ``fragments`` contiguous runs of about equal bytes: the
    element whose first byte is at offset o of the T bytes of all tensors (in order) goes to
    fragment ⌊o·N/T⌋, so every fragment holds T/N bytes to within an element. A tensor that is not
    contiguous cannot be cut and goes whole to the fragment of its first byte. ValueError if a
    fragment would be empty. Sharded parameters (DTensors) are cut in their unsharded element
    order, the same on every rank (``localize`` gives a rank its part)."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    parts: list[list[Piece]] = [[] for _ in range(fragments)]
    offset = 0
    for i, t in enumerate(tensors):
        size, numel, contiguous = t.element_size(), t.numel(), local(t).is_contiguous()
        if numel and not contiguous:
            parts[offset * fragments // total].append((i, 0, numel))
        start = 0 if contiguous else numel
        while start < numel:
            f = (offset + start * size) * fragments // total
            # the first element past fragment f: the least j with (offset + j·size)·N ≥ (f + 1)·T
            end = min(numel, -(-((f + 1) * total - offset * fragments) // (fragments * size)))
            parts[f].append((i, start, end))
            start = end
        offset += numel * size
    if any(not part for part in parts):
        raise ValueError(
            f"fragments (N) = {fragments}: the model's {total} bytes of parameters cannot be cut in so many"
        )
    return parts


def by_name(model: nn.Module, groups: tuple[tuple[str, ...], ...]) -> list[list[Piece]]:
    """Fragments named by module or parameter names (``named_parameters()``'s; a module's name
    stands for all its parameters): fragment f holds, whole and in the model's order, the
    parameters ``groups[f]`` names. ValueError unless every parameter is in exactly one fragment and
    every name names something."""
    names = [name for name, _ in model.named_parameters()]
    tensors = list(model.parameters())

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    owner: dict[int, int] = {}
    for f, group in enumerate(groups):
        for prefix in group:
            hits = [i for i, name in enumerate(names) if under(name, prefix)]
            if not hits:
                raise ValueError(
                    f"fragment {f}'s name {prefix!r} is no module or parameter of the model (with parameters)"
                )
            for i in hits:
                if owner.setdefault(i, f) != f:
                    raise ValueError(
                        f"parameter {names[i]!r} is in fragments {owner[i]} and {f}: each must be in one"
                    )
    missing = [names[i] for i in range(len(names)) if i not in owner]
    if missing:
        raise ValueError(
            f"parameter {missing[0]!r} is in no fragment ({len(missing)} are not): each must be in one"
        )
    return [
        [(i, 0, tensors[i].numel()) for i in sorted(i for i in owner if owner[i] == f)]
        for f in range(len(groups))
    ]


def _span(p: torch.Tensor) -> tuple[int, int]:
    """The elements of ``p`` (flattened row-major) this rank holds: all of a plain tensor; a run of
    rows of a parameter sharded on dim 0 (FSDP's ``fully_shard``)."""
    shard = local(p)
    if shard is p:
        return 0, p.numel()
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements, mesh = p.placements, p.device_mesh  # type: ignore[attr-defined]
    if list(placements) != [Shard(0)]:
        raise ValueError(f"fragments need parameters sharded on dim 0 (fully_shard's default): {placements}")
    _, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    start = offset[0] * math.prod(p.shape[1:])
    return start, start + shard.numel()


def localize(parts: list[list[Piece]], params: list[torch.Tensor]) -> list[list[Piece]]:
    """The pieces of ``cut(params)`` in this rank's shards (identity for unsharded parameters). A
    fragment of which a rank holds nothing becomes a piece of no elements, so that its outer step
    and its average exist (and do nothing) on every rank."""
    spans = [_span(p) for p in params]
    mine = []
    for part in parts:
        held = []
        for i, start, end in part:
            lo, hi = spans[i]
            if min(end, hi) > max(start, lo):
                held.append((i, max(start, lo) - lo, min(end, hi) - lo))
        mine.append(held or [(part[0][0], 0, 0)])
    return mine


def _touch(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether 1-D contiguous ``b`` starts where ``a`` ends, in the same storage."""
    return (
        a.dim() == b.dim() == 1
        and a.is_contiguous()
        and b.is_contiguous()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.data_ptr() + a.numel() * a.element_size() == b.data_ptr()
    )


class Layout:
    """How a list of views groups pieces: view j holds the pieces of ``shapes[j]`` (each piece's
    own shape: its parameter's if it is a whole parameter, else flat). States are saved per piece
    (``split``), so a checkpoint does not depend on how the views were grouped: it loads into a
    model packed or not, sharded or not."""

    def __init__(self, views: list[torch.Tensor], shapes: list[list[torch.Size]]) -> None:
        self.view_shapes = [v.shape for v in views]
        self.shapes = shapes
        self._starts = list(itertools.accumulate(map(len, shapes), initial=0))

    def pieces_of(self, j: int) -> range:
        """The indices of view j's pieces."""
        return range(self._starts[j], self._starts[j + 1])

    def split_one(self, j: int, t: torch.Tensor) -> list[torch.Tensor]:
        """A tensor laid out like view j -> its pieces (views of it)."""
        chunks = t.reshape(-1).split([math.prod(shape) for shape in self.shapes[j]])
        return [c.view(shape) for c, shape in zip(chunks, self.shapes[j], strict=True)]

    def split(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors laid out like the views -> one per piece (views of them)."""
        return [piece for j, t in enumerate(tensors) for piece in self.split_one(j, t)]

    def join_one(self, j: int, pieces: list[torch.Tensor]) -> torch.Tensor:
        """View j's pieces -> one tensor shaped like view j (new)."""
        return torch.cat([p.reshape(-1) for p in pieces]).view(self.view_shapes[j])

    def join(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """``split`` undone (new tensors); ValueError if the pieces are not this layout's."""
        if [tuple(p.shape) for p in pieces] != [tuple(s) for shapes in self.shapes for s in shapes]:
            raise ValueError(
                f"saved state of {len(pieces)} tensors ({sum(p.numel() for p in pieces)} elements) does not "
                f"fit this run's {sum(map(len, self.shapes))} pieces of parameters (another model or N)"
            )
        return [self.join_one(j, [pieces[q] for q in self.pieces_of(j)]) for j in range(len(self.shapes))]


class Selection:
    """A model's tensors for a list of pieces: a piece that is a whole tensor is that tensor (its
    shape kept), any other a flat slice of it; with ``join``, pieces that touch in memory are one
    flat view (the same grouping on every worker: their layouts are the same)."""

    def __init__(self, pieces: list[Piece], join: bool) -> None:
        self.pieces, self.join = pieces, join
        self.layout: Layout | None = None  # known once called
        self._cache: dict[int, tuple[list[int], list[torch.Tensor]]] = {}

    def __call__(self, model: nn.Module) -> list[torch.Tensor]:
        tensors = shards(model)
        addresses = [t.data_ptr() for t in tensors]
        cached = self._cache.get(id(model))
        if cached is not None and cached[0] == addresses:
            return cached[1]
        views: list[torch.Tensor] = []
        shapes: list[list[torch.Size]] = []
        for i, start, end in self.pieces:
            t = tensors[i].detach()
            whole_tensor = start == 0 and end == t.numel()
            keep = whole_tensor and not (self.join and t.is_contiguous())
            v = t if keep else t.view(-1)[start:end]  # (cut only contiguous tensors)
            shape = t.shape if whole_tensor else v.shape
            if self.join and views and _touch(views[-1], v):
                last = views[-1]
                views[-1] = last.as_strided((last.numel() + v.numel(),), (1,), last.storage_offset())
                shapes[-1].append(shape)
            else:
                views.append(v)
                shapes.append([shape])
        if self.layout is None:
            self.layout = Layout(views, shapes)
        self._cache[id(model)] = (addresses, views)
        return views
