"""The zoo's registry: preset name -> builder ("module:function") and a one-line description.

Builders are referenced by string and imported only when a preset is created, so listing the
zoo costs nothing and a family whose module is absent does not break the others.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Preset:
    """One named model. `target` is "package.module:function"; the function takes keyword
    overrides and returns an nn.Module."""

    name: str
    target: str
    description: str

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def function(self) -> str:
        return self.target.split(":", 1)[1]


class PresetUnavailableError(ImportError):
    """A preset's builder module or function cannot be imported."""


_ZOO = "lite3r_compile.models_zoo"

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "vggt-1b",
            f"{_ZOO}.vggt:build_vggt_1b",
            "VGGT-1B: DINOv2-L/14 + 24 frame/global block pairs; camera, depth, point, track heads",
        ),
        Preset(
            "vggt-tiny",
            f"{_ZOO}.vggt:build_vggt_tiny",
            "VGGT at toy sizes (embed 64, 4+4 blocks) with every code path of VGGT-1B",
        ),
        Preset(
            "da3-large",
            f"{_ZOO}.da3:build_da3_large",
            "Depth Anything 3 Large: DINOv2-L/14 with per-view and global blocks, DualDPT, camera",
        ),
        Preset("da3-tiny", f"{_ZOO}.da3:build_da3_tiny", "Depth Anything 3 at toy sizes"),
        Preset(
            "fast3r-tiny",
            f"{_ZOO}.fast3r:build_fast3r_tiny",
            "Fast3R-style global attention over the concatenated tokens of all views, toy sizes",
        ),
        Preset(
            "dust3r-tiny",
            f"{_ZOO}.dust3r:build_dust3r_tiny",
            "DUSt3R-style two-view encoder with cross-attention decoders, toy sizes",
        ),
        Preset(
            "pi3-tiny",
            f"{_ZOO}.pi3:build_pi3_tiny",
            "pi3-style permutation-equivariant alternating attention, toy sizes",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a ValueError lists the valid names (closest first) otherwise."""
    preset = PRESETS.get(name)
    if preset is None:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}")
    return preset


def resolve_builder(preset: Preset) -> Callable[..., nn.Module]:
    """Import the preset's builder function, with an error naming the module when it is missing."""
    try:
        module = importlib.import_module(preset.module)
    except ModuleNotFoundError as error:
        if error.name is not None and preset.module.startswith(error.name):
            raise PresetUnavailableError(
                f"preset {preset.name!r} needs module {preset.module}, which does not exist in this "
                f"installation; pick another preset ({', '.join(PRESETS)})"
            ) from error
        raise PresetUnavailableError(
            f"preset {preset.name!r}: importing {preset.module} failed because module {error.name!r} "
            f"is missing: {error}"
        ) from error
    builder = getattr(module, preset.function, None)
    if builder is None:
        raise PresetUnavailableError(
            f"preset {preset.name!r}: module {preset.module} has no function {preset.function!r}"
        )
    return builder
