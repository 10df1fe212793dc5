"""Distillation of a lite student against its dense teacher: data, losses, metrics, trainer.

``lite3r_compile.distill`` is both this package (``lite3r_compile.distill.metrics``, ``.data``,
...) and the trainer's entry point: ``lite3r_compile.distill(teacher, student, data, steps=...)``
calls :func:`lite3r_compile.distill.trainer.distill`.
"""

from __future__ import annotations

import sys
import types


class _DistillPackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from lite3r_compile.distill.trainer import distill

        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _DistillPackage
