"""Property-testing kit: random 3D-transformer architectures that know their attention sites.

Public so that users can property-test their own passes and models against ground truth:

- ``architectures(...)``: hypothesis strategy of ``GeneratedModel`` (model, example inputs, true
  attention sites, distractor modules, untraceable modules, description).
- ``attention_forms()``, ``attention_spellings()``, ``attention_specs()``, ``architecture_specs()``:
  the strategies it is made of.
- ``build_architecture(spec)``, ``one_site_model(spelling, ...)``: the same models without hypothesis.
- ``TrueSite``, ``GeneratedModel``, ``relative_error``, ``assert_close_rel``.
- ``memory_efficient_attention``, ``is_xformers_attention``: the xformers stand-in and its matcher.

The strategies need ``hypothesis`` (the ``test`` extra); everything else needs only torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "TrueSite": "lite3r_compile.testing.ground_truth",
    "GeneratedModel": "lite3r_compile.testing.ground_truth",
    "FORMS": "lite3r_compile.testing.ground_truth",
    "SCOPES": "lite3r_compile.testing.ground_truth",
    "relative_error": "lite3r_compile.testing.ground_truth",
    "assert_close_rel": "lite3r_compile.testing.ground_truth",
    "flatten_outputs": "lite3r_compile.testing.ground_truth",
    "AttentionSpec": "lite3r_compile.testing.attention",
    "SPELLINGS": "lite3r_compile.testing.attention",
    "ArchitectureSpec": "lite3r_compile.testing.architecture",
    "BlockSpec": "lite3r_compile.testing.architecture",
    "TwoViewBlockSpec": "lite3r_compile.testing.architecture",
    "build_architecture": "lite3r_compile.testing.architecture",
    "one_site_model": "lite3r_compile.testing.architecture",
    "memory_efficient_attention": "lite3r_compile.testing.xformers_ops",
    "is_xformers_attention": "lite3r_compile.testing.xformers_ops",
    "attention_forms": "lite3r_compile.testing.strategies",
    "attention_spellings": "lite3r_compile.testing.strategies",
    "attention_specs": "lite3r_compile.testing.strategies",
    "architecture_specs": "lite3r_compile.testing.strategies",
    "architectures": "lite3r_compile.testing.strategies",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lite3r_compile.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
