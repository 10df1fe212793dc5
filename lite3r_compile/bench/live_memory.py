"""The peak of live tensor bytes of eager code, and what is alive at that peak, on any device.

:class:`LiveMemory` is a ``TorchDispatchMode`` that counts the storages of the tensors the ops
inside it create, and forgets a storage when the last tensor viewing it is garbage collected. Run
on the ``meta`` device it answers "what would this model hold at S=32" in seconds without a GPU
(``benchmarks/memory_trace.py``). It models the program, not an allocator: no caching, rounding or
fragmentation, no workspaces of cuDNN or cuBLAS, no memory of CUDA graphs, and tensors made
outside the mode (the weights, the inputs) are not counted. An op with a memory-light kernel but a
heavy decomposition on ``meta`` (scaled-dot-product attention falls back to the math kernel there)
has to be replaced by a stand-in that allocates what the real kernel does.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class LiveTensor:
    """A storage alive at the peak: its bytes, the shape and dtype of the tensor that made it, and
    the label (:attr:`LiveMemory.label`) current when it was made."""

    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    label: str


@dataclass(eq=False)
class LiveMemory(TorchDispatchMode):
    """Counts live storage bytes of the tensors created inside the mode.

    ``peak_bytes``: the highest count; ``peak_op``: the op that reached it; :attr:`at_peak`: the
    storages alive then, largest first. Set ``label`` (e.g. from module pre-hooks) to say where the
    code is; each storage remembers the label it was made under.
    """

    label: str = ""
    live_bytes: int = 0
    peak_bytes: int = 0
    peak_op: str = ""
    # a snapshot at each new peak, sorted only when read: while memory grows, every op is a peak
    _at_peak: list[LiveTensor] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        self._refs: Counter = Counter()
        self._storages: dict[int, LiveTensor] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live_bytes -= self._storages.pop(key).nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._storages:
            self._storages[key] = LiveTensor(storage.nbytes(), tuple(tensor.shape), tensor.dtype, self.label)
            self.live_bytes += storage.nbytes()
        self._refs[key] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_op = self.live_bytes, f"{func} in {self.label or '?'}"
            self._at_peak = list(self._storages.values())
        return out

    @property
    def at_peak(self) -> list[LiveTensor]:
        """The storages alive at the peak, largest first."""
        return sorted(self._at_peak, key=lambda t: -t.nbytes)

    def by_label(self) -> dict[str, int]:
        """Bytes alive at the peak, summed by the label they were made under, largest first."""
        totals: Counter = Counter()
        for t in self._at_peak:
            totals[t.label] += t.nbytes
        return dict(totals.most_common())
