"""Hypothesis strategies over attention spellings and whole 3D-transformer architectures.

Every draw shrinks toward the plainest model: one frame block, SDPA, no mask, no distractor, no
control flow. Use them to property-test a pass against ground truth::

    from hypothesis import given
    from lite3r_compile.testing import architectures

    @given(architectures(max_blocks=3))
    def test_finds_every_site(generated):
        found = find_attention(generated.model, generated.example_inputs)
        assert sorted(s.path for s in found) == sorted(s.path for s in generated.sites)
"""

from __future__ import annotations

from typing import Optional, Sequence

from hypothesis import strategies as st

from lite3r_compile.testing.architecture import (
    MODEL_CONTROLS,
    ArchitectureSpec,
    BlockSpec,
    TwoViewBlockSpec,
    build_architecture,
)
from lite3r_compile.testing.attention import (
    ATTENTION_CONTROLS,
    CROSS_QKV_SOURCES,
    MHA_FORMS,
    SCALE_SPELLINGS,
    SELF_QKV_SOURCES,
    SPELLINGS,
    AttentionSpec,
)
from lite3r_compile.testing.distractors import MIXER_KINDS
from lite3r_compile.testing.ground_truth import FORMS, GeneratedModel

__all__ = ["attention_forms", "attention_spellings", "attention_specs", "architecture_specs", "architectures"]


def attention_forms() -> st.SearchStrategy[str]:
    """The attention forms of the design (``ground_truth.FORMS``)."""
    return st.sampled_from(FORMS)


def attention_spellings(forms: Optional[Sequence[str]] = None) -> st.SearchStrategy[str]:
    """Every exact spelling of the given forms (default: all forms)."""
    _check_forms(forms)
    return st.sampled_from([s for form in (forms or FORMS) for s in SPELLINGS[form]])


def _check_controls(controls: Sequence[str]) -> None:
    unknown = set(controls) - set(ATTENTION_CONTROLS)
    if unknown:
        raise ValueError(f"unknown attention controls {sorted(unknown)}; choose from {ATTENTION_CONTROLS}")


def _check_forms(forms: Optional[Sequence[str]]) -> None:
    unknown = set(forms or ()) - set(FORMS)
    if unknown:
        raise ValueError(f"unknown attention forms {sorted(unknown)}; choose from {FORMS}")


@st.composite
def attention_specs(
    draw,
    *,
    num_heads: int = 2,
    cross: bool = False,
    forms: Optional[Sequence[str]] = None,
    allow_masks: bool = True,
    allow_untraceable: bool = True,
    attention_controls: Sequence[str] = ATTENTION_CONTROLS,
) -> AttentionSpec:
    """One attention module's spelling, layout, q/k/v source, qk-norm, RoPE, mask, scale and
    control flow (see ``AttentionSpec``); ``attention_controls`` limits the control flow drawn
    inside the module (any of ``ATTENTION_CONTROLS``) when ``allow_untraceable``."""
    _check_forms(forms)
    _check_controls(attention_controls)
    form = draw(st.sampled_from(tuple(forms or FORMS)))
    spelling = draw(st.sampled_from(SPELLINGS[form]))
    mha = form in MHA_FORMS
    layout = "bhnd" if mha else draw(st.sampled_from(("bhnd", "bnhd")))
    if mha:
        qkv_source = "in_proj"
    else:
        qkv_source = draw(st.sampled_from(CROSS_QKV_SOURCES if cross else SELF_QKV_SOURCES))
    qk_norm = False if mha else draw(st.booleans())
    rope = False if (mha or cross) else draw(st.booleans())
    # a coin first, then the kind: half the sites stay unmasked (rewritable) and uncontrolled
    mask_kind = None
    if allow_masks and draw(st.booleans()):
        mask_kind = draw(st.sampled_from(("additive",) if spelling == "xformers" else ("additive", "bool")))
    custom_scale = draw(st.booleans()) if spelling in SCALE_SPELLINGS else False
    control = None
    controls = tuple(c for c in attention_controls if rope or c != "int_rope")
    if allow_untraceable and not mha and controls and draw(st.booleans()):
        control = draw(st.sampled_from(controls))
    return AttentionSpec(
        form=form,
        spelling=spelling,
        num_heads=num_heads,
        layout=layout,
        qkv_source=qkv_source,
        qk_norm=qk_norm,
        rope=rope,
        mask_kind=mask_kind,
        custom_scale=custom_scale,
        control=control,
        cross=cross,
    )


@st.composite
def architecture_specs(
    draw,
    *,
    max_blocks: int = 4,
    max_views: int = 3,
    max_decoder_blocks: int = 2,
    forms: Optional[Sequence[str]] = None,
    allow_masks: bool = True,
    allow_cross: bool = True,
    allow_untraceable: bool = True,
    attention_controls: Sequence[str] = ATTENTION_CONTROLS,
    allow_distractors: bool = True,
    input_kinds: Sequence[str] = ("tokens", "images"),
) -> ArchitectureSpec:
    """An ``ArchitectureSpec``: B in {1, 2}, S in [1, max_views], P in [2, 9] tokens per view,
    C in {16, 32}, H in {1, 2, 4}, 1..max_blocks frame/global blocks; with ``allow_cross`` up to
    ``max_decoder_blocks`` layers of a two-view decoder (when S == 2) and of a latent
    cross-attention decoder; optional distractors and control flow."""
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
    seed = draw(st.integers(0, 2**31 - 1))
    batch = draw(st.integers(1, 2))
    # two views first: the smallest case where frame and global differ (and shrinking goes there)
    views = draw(st.sampled_from([v for v in (2, 1, *range(3, max_views + 1)) if v <= max_views]))
    input_kind = draw(st.sampled_from(tuple(input_kinds)))
    grid = (draw(st.integers(1, 3)), draw(st.integers(2, 3)))
    dim = draw(st.sampled_from((16, 32)))
    num_heads = draw(st.sampled_from((1, 2, 4)))
    attention = attention_specs(
        num_heads=num_heads,
        forms=forms,
        allow_masks=allow_masks,
        allow_untraceable=allow_untraceable,
        attention_controls=attention_controls,
    )
    block = st.builds(
        BlockSpec,
        scope=st.sampled_from(("frame", "global")),
        attention=attention,
        mixer=st.sampled_from((None,) + MIXER_KINDS) if allow_distractors else st.none(),
        data_branch=st.booleans() if allow_untraceable else st.just(False),
    )
    blocks = tuple(draw(st.lists(block, min_size=1, max_size=max_blocks)))
    decoder: tuple[AttentionSpec, ...] = ()
    two_view_decoder: tuple[TwoViewBlockSpec, ...] = ()
    if allow_cross:
        cross_attention = attention_specs(
            num_heads=num_heads,
            cross=True,
            forms=forms,
            allow_masks=allow_masks,
            allow_untraceable=allow_untraceable,
            attention_controls=attention_controls,
        )
        if views == 2:
            layer = st.builds(TwoViewBlockSpec, self_attention=attention, cross_attention=cross_attention)
            two_view_decoder = tuple(draw(st.lists(layer, max_size=max_decoder_blocks)))
        decoder = tuple(draw(st.lists(cross_attention, max_size=max_decoder_blocks)))
    num_latents = draw(st.integers(1, 4))
    model_controls: tuple[str, ...] = ()
    if allow_untraceable:
        model_controls = tuple(draw(st.lists(st.sampled_from(MODEL_CONTROLS), unique=True, max_size=2)))
    classifier = draw(st.booleans()) if allow_distractors else False
    return ArchitectureSpec(
        seed=seed,
        batch=batch,
        views=views,
        dim=dim,
        input_kind=input_kind,
        grid=grid,
        blocks=blocks,
        two_view_decoder=two_view_decoder,
        decoder=decoder,
        num_latents=num_latents,
        model_controls=model_controls,
        classifier=classifier,
    )


def architectures(
    *,
    max_blocks: int = 4,
    max_views: int = 3,
    max_decoder_blocks: int = 2,
    forms: Optional[Sequence[str]] = None,
    allow_masks: bool = True,
    allow_cross: bool = True,
    allow_untraceable: bool = True,
    attention_controls: Sequence[str] = ATTENTION_CONTROLS,
    allow_distractors: bool = True,
    input_kinds: Sequence[str] = ("tokens", "images"),
) -> st.SearchStrategy[GeneratedModel]:
    """Built models with their ground truth (``GeneratedModel``), from ``architecture_specs``.

    ``forms`` restricts the attention forms drawn (e.g. ``("sdpa", "manual_scale_after")``);
    ``allow_masks=False`` draws only rewritable sites; ``allow_untraceable=False`` draws models
    every module of which ``torch.fx.symbolic_trace`` can trace, except ``nn.MultiheadAttention``;
    ``attention_controls`` picks the control flow drawn inside attention modules (``()`` keeps
    it all outside them, ``("shape_branch",)`` keeps every site capturable by make_fx).
    """
    return architecture_specs(
        max_blocks=max_blocks,
        max_views=max_views,
        max_decoder_blocks=max_decoder_blocks,
        forms=forms,
        allow_masks=allow_masks,
        allow_cross=allow_cross,
        allow_untraceable=allow_untraceable,
        attention_controls=attention_controls,
        allow_distractors=allow_distractors,
        input_kinds=input_kinds,
    ).map(build_architecture)
