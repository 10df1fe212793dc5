"""What changed in a module since the last look, cheaply enough to ask before every call.

A lite student's eval-mode calls run a deployed copy built from the student's weights (see
:class:`~lite3r_compile.backends.deploy.EvalBackend`). Before each call the router must know
whether the student's tensors were replaced or moved (rebuild the copy), written in place
(refresh it) or hooked (run eagerly so that the hooks fire). Walking ``named_parameters()``,
``named_buffers()`` and ``modules()`` answers that, but on VGGT-1B (1,405 tensors, ~1,000
modules) it costs ~9 ms of host time a call on a 2-core CI CPU, while the GPU waits.

:class:`ModuleWatch` walks once and keeps flat lists: every parent-child edge, every
parameter and buffer slot with the tensor in it, and each tensor's storage pointer. A check
then compares identities, pointers and version counters (0.7 ms on the same CPU). It walks
again only when something differs, or when any module has registered a module, parameter or
buffer since (process-wide registration hooks count those).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

from torch import nn

# bumped whenever any module anywhere registers a submodule, parameter or buffer (setattr,
# register_*): a watch taken before then walks again
_registrations = itertools.count()
_epoch = next(_registrations)


def _registered(*_args: object) -> None:
    global _epoch
    _epoch = next(_registrations)


nn.modules.module.register_module_module_registration_hook(_registered)
nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_buffer_registration_hook(_registered)


class ModuleState(NamedTuple):
    """A module's tensors and hooks at one moment. ``structure`` changes when a tensor is
    replaced, moved or re-pointed (``.to``, ``.data =``, a module swapped, even through
    ``_modules`` or ``_parameters`` directly); ``versions`` on every in-place write (optimizer
    steps, ``load_state_dict``); ``hooked``: a submodule (not the module itself) has forward or
    forward-pre hooks."""

    structure: tuple
    versions: tuple
    hooked: bool


class ModuleWatch:
    """Watches ``module``; :meth:`look` gives its :class:`ModuleState`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._walk()

    def _walk(self) -> None:
        module = self.module
        self._epoch = _epoch
        self._edges = [(parent._modules, name, child) for parent in module.modules()
                       for name, child in parent._modules.items()]
        self._submodules = [m for m in module.modules() if m is not module]
        named = [*module.named_parameters(), *module.named_buffers()]
        by_path = dict(module.named_modules())
        self._slots = []
        for name, t in named:
            path, _, key = name.rpartition(".")
            owner = by_path[path]
            table = owner._parameters if key in owner._parameters else owner._buffers
            self._slots.append((table, key, t))
        self._tensors = [t for _, t in named]
        self._pointers = [t.data_ptr() for t in self._tensors]
        # inference tensors cannot be written outside inference mode: they have no version
        self._inference = [t.is_inference() for t in self._tensors]
        self._structure = tuple((name, id(t), ptr, t.dtype, t.device)
                                for (name, t), ptr in zip(named, self._pointers))

    def _stale(self) -> bool:
        if self._epoch != _epoch:
            return True
        if any(slots.get(name) is not child for slots, name, child in self._edges):
            return True
        if any(slots.get(key) is not t for slots, key, t in self._slots):
            return True
        return any(t.data_ptr() != ptr for t, ptr in zip(self._tensors, self._pointers))

    def look(self) -> ModuleState:
        """The module as it is now (walking again first if anything differs from the last walk)."""
        if self._stale():
            self._walk()
        versions = tuple(0 if inference else t._version for t, inference in zip(self._tensors, self._inference))
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in self._submodules)
        return ModuleState(self._structure, versions, hooked)


__all__ = ["ModuleState", "ModuleWatch"]
