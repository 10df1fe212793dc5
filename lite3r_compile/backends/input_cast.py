"""Casting a head's inputs to the head's dtype, one list item at a time as the head reads it.

A head that runs in another precision than its backbone (float32 behind a bfloat16 backbone, as
upstream runs them; bfloat16 with ``LiteConfig.bf16_heads``) needs its floating-point inputs in its
own dtype. Casting them on entry is wrong for the 3D models' heads: VGGT hands every head the
list of all 24 aggregator layers (2048 wide) and each head reads one (the camera head) or four
(the DPT heads). A float32 camera head that casts the whole list on entry holds 24 float32 copies
while it runs: 8.6 GB at S=32 frames of 518x518, more than the aggregator's own activations.

:func:`cast_head_inputs` casts plain tensors at once and wraps each list or tuple argument in a
:class:`CastOnRead`, which casts an item the first time the head reads it and keeps that copy for
the rest of the call (a chunked DPT head reads each of its layers once per chunk of frames). Under
``torch.compile`` the inputs are cast on entry: the copies the head never reads are dead code there.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map_only


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it (also inside lists, tuples and dicts) cast
    to ``dtype``, at once."""
    return tree_map_only(Tensor, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t, value)


def _needs_cast(value: Any, dtype: torch.dtype) -> bool:
    return any(isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype for t in tree_flatten(value)[0])


class CastOnRead(Sequence):
    """A read-only view of the list or tuple ``items`` whose item ``i`` is
    ``cast_floats(items[i], dtype)``, computed when first read and kept while the view lives.

    It is a :class:`collections.abc.Sequence` (indexing, negative indices, slices, ``len``,
    iteration, ``in``), not a ``list``: a head that tests ``isinstance(x, list)`` on its input would
    see the difference; the zoo's heads index and iterate.
    """

    def __init__(self, items: Sequence[Any], dtype: torch.dtype) -> None:
        self._items = items
        self._dtype = dtype
        self._cast: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._items)))]
        i = operator.index(index)
        if i < 0:
            i += len(self._items)
        if not 0 <= i < len(self._items):
            raise IndexError(f"CastOnRead: index {index} out of range for {len(self._items)} items")
        if i not in self._cast:
            self._cast[i] = cast_floats(self._items[i], self._dtype)
        return self._cast[i]

    def read_indices(self) -> list[int]:
        """The items read so far, in index order."""
        return sorted(self._cast)

    def __repr__(self) -> str:
        return f"CastOnRead({len(self._items)} items to {self._dtype}, read {self.read_indices()})"


def _cast_argument(value: Any, dtype: torch.dtype) -> Any:
    if not _needs_cast(value, dtype):
        return value
    if isinstance(value, (list, tuple)):
        return CastOnRead(value, dtype)
    return cast_floats(value, dtype)


def cast_head_inputs(args: tuple, kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
    """A head's positional and keyword arguments with their floating-point tensors in ``dtype``: a
    tensor (or a dict of them) cast now, a list or tuple holding a tensor to cast as a
    :class:`CastOnRead`; an argument with nothing to cast passed as it is; everything cast now
    while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return cast_floats(args, dtype), cast_floats(kwargs, dtype)
    return (tuple(_cast_argument(a, dtype) for a in args),
            {k: _cast_argument(v, dtype) for k, v in kwargs.items()})
