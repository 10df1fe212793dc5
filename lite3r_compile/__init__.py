"""lite3r-compile: Sparse Linear Attention + FP8 students of 3D reconstruction transformers.

The public face. Names are resolved lazily so that ``import lite3r_compile`` stays cheap (no
Triton, torchao or model code is imported until it is used)::

    import lite3r_compile
    student = lite3r_compile.lite(model, backend="fp8")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "lite": "lite3r_compile.api",
    "LiteConfig": "lite3r_compile.config",
    "FP8Config": "lite3r_compile.config",
    "SLAConfig": "lite3r_compile.sla.config",
    "SparseLinearAttention": "lite3r_compile.sla.module",
    "find_attention": "lite3r_compile.passes.attention",
    "AttentionSite": "lite3r_compile.passes.attention",
    "report": "lite3r_compile.reporting",
    # the subpackage, which is callable: lite3r_compile.distill(teacher, student, data, steps=...)
    "distill": "lite3r_compile.distill",
    "DistillResult": "lite3r_compile.distill.trainer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lite3r_compile' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module == f"{__name__}.{name}" else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from lite3r_compile.api import lite
    from lite3r_compile.config import FP8Config, LiteConfig
    from lite3r_compile import distill
    from lite3r_compile.distill.trainer import DistillResult
    from lite3r_compile.passes.attention import AttentionSite, find_attention
    from lite3r_compile.reporting import report
    from lite3r_compile.sla.config import SLAConfig
    from lite3r_compile.sla.module import SparseLinearAttention
