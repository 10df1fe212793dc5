"""Configuration of :func:`lite3r_compile.lite`: which attention sites get SLA, which Linear layers
get FP8 fake-quantization, and which parameters stay trainable.

Every path glob below is matched with :func:`fnmatch.fnmatchcase` against a dotted module path
(``aggregator.frame_blocks.0.attn``) or parameter name; ``*`` also matches dots, so
``"aggregator.*"`` covers everything under ``aggregator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from lite3r_compile.sla.config import SLAConfig

Granularity = Literal["rowwise", "tensorwise"]
GRANULARITIES: tuple[str, ...] = ("rowwise", "tensorwise")
SCOPES: tuple[str, ...] = ("frame", "global", "cross", "self")

# A head is any module whose own name (one path component) matches one of these.
HEAD_NAME_GLOBS: tuple[str, ...] = ("head", "heads", "*_head", "*_heads", "head_*")
# A patch embedding is any module whose own name matches one of these (timm, DINOv2, VGGT, DA3).
PATCH_EMBED_NAME_GLOBS: tuple[str, ...] = ("patch_embed", "patch_embed_*", "*_patch_embed")


def matches_any(path: str, globs: tuple[str, ...]) -> bool:
    """Whether ``path`` matches one of ``globs`` (case-sensitive fnmatch)."""
    return any(fnmatchcase(path, g) for g in globs)


def ancestor_named(path: str, globs: tuple[str, ...]) -> str | None:
    """The shortest prefix of ``path`` whose last component matches ``globs``
    (``ancestor_named("a.camera_head.fc", HEAD_NAME_GLOBS) == "a.camera_head"``), or None."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if matches_any(part, globs):
            return ".".join(parts[: i + 1])
    return None


def pixel_embedding_of(path: str, block: str | None) -> str | None:
    """The patch embedding (a module named like :data:`PATCH_EMBED_NAME_GLOBS`) whose own layers
    include the layer at ``path``, or None; ``block`` is the transformer block holding the layer,
    if any. A block inside a module named like a patch embedding (VGGT calls its whole DINOv2
    backbone ``patch_embed``) does not see pixels, so its layers belong to no patch embedding."""
    patch_embed = ancestor_named(path, PATCH_EMBED_NAME_GLOBS)
    if patch_embed is None or (block or "").startswith(patch_embed + "."):
        return None
    return patch_embed


def _as_globs(owner: object, name: str) -> None:
    """Accept a list or a single string where a tuple of globs is expected (frozen dataclass)."""
    value = getattr(owner, name)
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    for g in value:
        if not isinstance(g, str) or not g:
            raise TypeError(f"{type(owner).__name__}.{name} must hold non-empty glob strings, got {g!r}")
    object.__setattr__(owner, name, value)


@dataclass(frozen=True)
class FP8Config:
    """FP8 (e4m3) fake-quantization of Linear layers for quantization-aware training.

    Which Linear layers are quantized, in order of precedence:

    1. ``exclude`` globs (module paths) win over everything: matching layers stay high precision.
    2. Layers whose ``in_features`` or ``out_features`` are not multiples of ``multiple_of`` stay
       high precision (FP8 GEMMs need 16-aligned dims); they are reported, never silently left.
    3. ``include`` globs quantize a layer even outside a transformer block, under a head or
       under the patch embedding.
    4. With ``skip_patch_embed``, layers under a module named like a patch embedding
       (``patch_embed``; see :data:`PATCH_EMBED_NAME_GLOBS`) stay high precision, except those in
       a transformer block inside it: VGGT names its whole DINOv2 backbone ``patch_embed``, and
       its blocks do not see pixels.
    5. With ``skip_heads``, layers under a module named like a head (``camera_head``, ``head``,
       ...; see :data:`HEAD_NAME_GLOBS`) stay high precision.
    6. Otherwise a layer is quantized when it sits inside a transformer block: the parent module of
       an attention site (``blocks.3`` for the site ``blocks.3.attn``). A model without attention
       has no blocks; then every remaining Linear layer is quantized (an FP8-only student).

    Linear layers inside Sparse Linear Attention (``proj_l``), the packed projections of
    ``nn.MultiheadAttention`` (its forward reads the weights directly) and subclasses of
    ``nn.Linear`` (their forward may not be ``F.linear``) are never quantized; the report lists
    them with the reason.

    ``granularity``: ``"rowwise"`` takes one absmax scale per weight row (output channel) and per
    activation row (token); ``"tensorwise"`` one scale per tensor.
    ``quantize_activations``: fake-quantize the Linear inputs too (FP8 x FP8 GEMM), not only the
    weights.
    ``keep_high_precision``: the number of transformer blocks, most FP8-sensitive first, whose
    Linear layers stay high precision (rule ``sensitive``). ``lite()`` measures the sensitivity
    (:func:`lite3r_compile.sensitivity.fp8_sensitivity`: the relative output change when only
    that block is fake-quantized) on its ``example_inputs``, after the SLA rewrite, so pass
    representative inputs; a budget larger than the number of blocks with FP8 layers is an error.
    For a fixed choice, put :func:`lite3r_compile.sensitivity.block_globs` in ``exclude`` instead.
    """

    enabled: bool = True
    granularity: Granularity = "rowwise"
    quantize_activations: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_patch_embed: bool = True
    skip_heads: bool = True
    multiple_of: int = 16
    keep_high_precision: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.keep_high_precision, int) or self.keep_high_precision < 0:
            raise ValueError(
                f"FP8Config.keep_high_precision must be an int >= 0 (a number of transformer blocks), "
                f"got {self.keep_high_precision!r}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"FP8Config.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.multiple_of < 1:
            raise ValueError(f"FP8Config.multiple_of must be >= 1, got {self.multiple_of}")
        _as_globs(self, "include")
        _as_globs(self, "exclude")


@dataclass(frozen=True)
class LiteConfig:
    """What :func:`lite3r_compile.lite` does to a model.

    ``sla``: the Sparse Linear Attention settings of every rewritten site, unless a glob of
    ``sla_overrides`` (``((site_glob, SLAConfig), ...)``, first match wins) gives a site its own.
    ``sla_scopes``: attention scopes that get SLA (``"frame"``, ``"global"``, ``"cross"``,
    ``"self"``); sites of other scopes stay dense.
    ``sla_include``: when non-empty, only sites whose path matches one of these globs get SLA.
    ``sla_exclude``: sites whose path matches one of these globs stay dense.
    ``fp8``: see :class:`FP8Config`.
    ``trainable``: parameter-name globs left trainable in addition to the SLA ``proj_l`` weights
    and biases (everything else is frozen).
    ``bf16_heads``: globs of head paths (modules named by :data:`HEAD_NAME_GLOBS`, e.g.
    ``("depth_head", "point_head")``; ``("*",)`` for every head) that the deployed form
    (backends ``"fp8"`` and ``"inductor"``) runs in bfloat16 instead of the float32 VGGT and DA3
    give their heads (:mod:`lite3r_compile.backends.head_precision`). The eager student and
    distillation keep the heads as they are.
    ``head_frames_chunk``: heads that run the frames in chunks (a ``frames_chunk_size``
    attribute: VGGT's DPT heads, 8 frames at a time upstream) run this many at a time in the
    deployed form. A chunk's full-resolution features are the largest activations of such a head,
    so a smaller chunk lowers the peak memory; the outputs are the same. ``None`` keeps the
    model's.
    ``regional_compile``: the deployed form compiles each repeated block (one graph per block
    class and shape, reused by every block of the class) and each head instead of the whole model,
    and runs the rest eagerly (:mod:`lite3r_compile.backends.regions`): a fraction of the compile
    time.
    ``cuda_graphs``: the deployed form on a CUDA GPU replays its compiled graphs as CUDA graphs
    (Inductor's CUDA graph trees; each eval call is a new step), which removes their launch
    overhead; a new input shape records new graphs.
    ``inductor_multi_kernel``: the deployed form's reductions over rows wider than Inductor's
    persistent-reduction limit (1024) also get a persistent variant, picked when it times faster
    (Inductor's ``triton.multi_kernel``). The FP8 quantization of an MLP's 4096-wide GELU output
    was one (as a looped reduction it computes the GELU twice); the deployed form now quantizes it
    in a kernel of its own (:mod:`lite3r_compile.backends.fuse_gelu`). On torch 2.11 with CUDA
    graphs, 16 of 22 compiles failed with multi-kernel on (``benchmarks/NOTES.md``, session 6).
    ``bilinear_kernel``: the deployed form runs the bilinear resizes of its compiled graphs in
    ``lite3r::upsample_bilinear2d`` (the ``lite3r`` backend's option of that name,
    :mod:`lite3r_compile.backends.graph_upsample`); False leaves them to Inductor.
    """

    sla: SLAConfig = field(default_factory=SLAConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    sla_scopes: tuple[str, ...] = SCOPES
    sla_include: tuple[str, ...] = ()
    sla_exclude: tuple[str, ...] = ()
    sla_overrides: tuple[tuple[str, SLAConfig], ...] = ()
    trainable: tuple[str, ...] = ()
    bf16_heads: tuple[str, ...] = ()
    head_frames_chunk: int | None = None
    regional_compile: bool = False
    cuda_graphs: bool = False
    inductor_multi_kernel: bool = False
    bilinear_kernel: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.sla, SLAConfig):
            raise TypeError(f"LiteConfig.sla must be an SLAConfig, got {type(self.sla).__name__}")
        if not isinstance(self.fp8, FP8Config):
            raise TypeError(f"LiteConfig.fp8 must be an FP8Config, got {type(self.fp8).__name__}")
        for name in ("sla_scopes", "sla_include", "sla_exclude", "trainable", "bf16_heads"):
            _as_globs(self, name)
        unknown = [s for s in self.sla_scopes if s not in SCOPES]
        if unknown:
            raise ValueError(f"LiteConfig.sla_scopes: unknown scopes {unknown}; known: {SCOPES}")
        overrides = tuple(tuple(o) for o in self.sla_overrides)
        for o in overrides:
            if len(o) != 2 or not isinstance(o[0], str) or not isinstance(o[1], SLAConfig):
                raise TypeError(
                    f"LiteConfig.sla_overrides entries must be (site_glob, SLAConfig), got {o!r}"
                )
        object.__setattr__(self, "sla_overrides", overrides)
        if self.head_frames_chunk is not None and (not isinstance(self.head_frames_chunk, int)
                                                   or self.head_frames_chunk < 1):
            raise ValueError(f"LiteConfig.head_frames_chunk must be a positive int or None, got "
                             f"{self.head_frames_chunk!r}")

    def sla_for(self, path: str, scope: str) -> tuple[SLAConfig | None, str]:
        """The SLA settings of the site at ``path`` with ``scope``, or ``None`` and why it stays
        dense by configuration."""
        if scope not in self.sla_scopes:
            return None, f"scope {scope!r} not in LiteConfig.sla_scopes {self.sla_scopes}"
        if self.sla_include and not matches_any(path, self.sla_include):
            return None, f"not matched by LiteConfig.sla_include {self.sla_include}"
        if matches_any(path, self.sla_exclude):
            return None, f"matched by LiteConfig.sla_exclude {self.sla_exclude}"
        for glob, sla in self.sla_overrides:
            if fnmatchcase(path, glob):
                return sla, f"LiteConfig.sla_overrides {glob!r}"
        return self.sla, ""
