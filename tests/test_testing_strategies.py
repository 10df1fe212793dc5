"""The property-testing kit must tell the truth: generated models run, their ground truth names
real modules with the right scopes and traceability, and every spelling is the same attention."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from lite3r_compile.testing import (
    SPELLINGS,
    ArchitectureSpec,
    AttentionSpec,
    BlockSpec,
    GeneratedModel,
    TwoViewBlockSpec,
    architecture_specs,
    architectures,
    assert_close_rel,
    attention_forms,
    attention_spellings,
    build_architecture,
    is_xformers_attention,
    memory_efficient_attention,
    one_site_model,
    relative_error,
)
from lite3r_compile.testing.attention import (
    FunctionalCrossMultiheadAttention,
    FunctionalMultiheadAttention,
    SpelledAttention,
    SpelledCrossAttention,
)

SPELLED = [s for form, spellings in SPELLINGS.items() if not form.startswith("mha") for s in spellings]


def _traces(module: nn.Module) -> bool:
    try:
        torch.fx.symbolic_trace(module)
    except Exception:  # TraceError, TypeError from Proxy item assignment, ...
        return False
    return True


@given(architectures())
def test_generated_models_run_forward_and_backward(generated: GeneratedModel):
    spec = generated.spec
    model = generated.model
    outputs = model(*generated.example_inputs)
    assert outputs["points"].shape == (spec.batch, spec.views, spec.tokens_per_view, 3)
    if spec.decoder:
        assert outputs["latents"].shape == (spec.batch, spec.num_latents, spec.dim)
    if spec.classifier:
        assert torch.allclose(outputs["class_probs"].sum(-1), torch.ones(spec.batch))
    for tensor in outputs.values():
        assert torch.isfinite(tensor).all()
    sum(t.sum() for t in outputs.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@given(architectures())
def test_ground_truth_names_real_modules(generated: GeneratedModel):
    modules = dict(generated.model.named_modules())
    paths = [site.path for site in generated.sites]
    spec = generated.spec
    assert len(paths) == len(set(paths)) == len(spec.blocks) + 4 * len(spec.two_view_decoder) + len(spec.decoder)
    for site in generated.sites:
        module = modules[site.path]
        cross = site.scope == "cross"
        expected = {
            "mha_module": nn.MultiheadAttention,
            "mha_functional": FunctionalCrossMultiheadAttention if cross else FunctionalMultiheadAttention,
        }.get(site.form, SpelledCrossAttention if cross else SpelledAttention)
        assert type(module) is expected, site
        assert site.num_heads * site.head_dim == generated.spec.dim
        assert site.has_mask == (site.mask_kind is not None)
    for path in generated.distractor_paths:
        assert path in modules and path not in paths
        assert not any(site.path.startswith(path + ".") or path.startswith(site.path + ".") for site in generated.sites)
    for path in generated.untraceable_paths:
        assert path in modules


def _site_inputs(generated: GeneratedModel) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each site module is called with in the model's forward."""
    modules = dict(generated.model.named_modules())
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = [
        modules[site.path].register_forward_pre_hook(
            lambda m, args, kwargs, path=site.path: calls.setdefault(path, (args, kwargs)) and None, with_kwargs=True
        )
        for site in generated.sites
    ]
    try:
        generated.model(*generated.example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _make_fx_traces(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    names = list(kwargs)

    def call(*flat):
        return module(*flat[: len(args)], **dict(zip(names, flat[len(args) :])))

    try:
        graph_module = make_fx(call)(*args, *kwargs.values())
    except RuntimeError as error:  # data-dependent control flow
        assert "data-dependent" in str(error) or "_local_scalar_dense" in str(error), error
        return False
    assert relative_error(graph_module(*args, *kwargs.values()), module(*args, **kwargs)) < 1e-6
    return True


@given(architectures())
def test_traceability_ground_truth(generated: GeneratedModel):
    modules = dict(generated.model.named_modules())
    for site in generated.sites:
        assert _traces(modules[site.path]) == site.symbolic_traceable == (site.capture == "symbolic_trace"), site
    for path in generated.untraceable_paths:
        assert not _traces(modules[path]), path
    # nn.MultiheadAttention is a leaf of FX's default tracer, so only the other untraceable
    # modules stop the root from tracing.
    mha_paths = {s.path for s in generated.sites if s.form == "mha_module"}
    root_stoppers = [p for p in generated.untraceable_paths if p not in mha_paths]
    assert _traces(generated.model) == (not root_stoppers), root_stoppers


@given(architectures())
def test_scopes_match_the_shapes_each_site_sees(generated: GeneratedModel):
    spec = generated.spec
    B, S, P, C = spec.batch, spec.views, spec.tokens_per_view, spec.dim
    seen: dict[str, list[tuple]] = {}
    modules = dict(generated.model.named_modules())
    handles = [
        modules[site.path].register_forward_pre_hook(
            lambda m, args, kwargs, path=site.path: seen.setdefault(path, []).append(
                tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            ),
            with_kwargs=True,
        )
        for site in generated.sites
    ]
    try:
        generated.model(*generated.example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    for site in generated.sites:
        shapes = seen[site.path]
        assert len(shapes) == 1, site
        query_shape = shapes[0][0]
        if site.path.startswith("dec_blocks"):  # two-view decoder: one view per call, S == 2
            assert S == 2 and site.scope in ("frame", "cross")
            assert shapes[0] == ((B, P, C),) * len(shapes[0])
        elif site.scope == "cross":
            assert query_shape == (B, spec.num_latents, C)
            assert (B, S * P, C) in shapes[0][1:]
        elif site.scope == "frame":
            assert S > 1 and query_shape == (B * S, P, C)
        elif site.scope == "global":
            assert S > 1 and query_shape == (B, S * P, C)
        else:
            assert site.scope == "self" and S == 1 and query_shape == (B, P, C)


@given(architecture_specs(max_blocks=3))
def test_build_is_deterministic_and_leaves_the_rng_alone(spec: ArchitectureSpec):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first, second = build_architecture(spec), build_architecture(spec)
    assert torch.equal(torch.get_rng_state(), before)
    assert first.description == second.description and first.sites == second.sites
    for a, b in zip(first.example_inputs, second.example_inputs):
        assert torch.equal(a, b)
    state_a, state_b = first.model.state_dict(), second.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    out_a, out_b = first.model(*first.example_inputs), second.model(*second.example_inputs)
    assert relative_error(out_a, out_b) == 0.0


@given(architectures(allow_masks=False, allow_cross=False, allow_untraceable=False, allow_distractors=False))
def test_restricted_draws_respect_their_limits(generated: GeneratedModel):
    assert not generated.untraceable_paths or all(
        generated.site(path).form == "mha_module" for path in generated.untraceable_paths
    )
    assert not generated.distractor_paths
    assert all(not s.has_mask and s.scope != "cross" for s in generated.sites)


@given(st.data())
def test_forms_restriction(data):
    forms = data.draw(st.lists(attention_forms(), min_size=1, unique=True))
    generated = data.draw(architectures(forms=forms, max_blocks=2))
    assert {site.form for site in generated.sites} <= set(forms)
    assert data.draw(attention_spellings(forms)) in {s for f in forms for s in SPELLINGS[f]}


def test_unknown_forms_are_refused():
    with pytest.raises(ValueError, match="unknown attention forms"):
        attention_spellings(["flash"])


@pytest.mark.parametrize("spelling", SPELLED)
def test_every_spelling_is_the_same_attention(spelling):
    form = next(f for f, s in SPELLINGS.items() if spelling in s)
    for layout, mask_kind, cross in itertools.product(("bhnd", "bnhd"), (None, "additive", "bool"), (False, True)):
        if spelling == "xformers" and mask_kind == "bool":
            continue  # xformers takes additive biases only
        spec = AttentionSpec(
            form=form,
            spelling=spelling,
            num_heads=2,
            layout=layout,
            qkv_source="kv_packed" if cross else "unbind",
            qk_norm=True,
            rope=not cross,
            mask_kind=mask_kind,
            cross=cross,
        )
        torch.manual_seed(0)
        module = (SpelledCrossAttention if cross else SpelledAttention)(16, spec)
        x = torch.randn(2, 5, 16)
        second = torch.randn(2, 7, 16) if cross else torch.arange(5).expand(2, 5)  # context or pos
        out = module(x, second)
        # the plainest spelling on the same projections is the reference
        module.spelling = "sdpa_scale"
        reference = module(x, second)
        assert_close_rel(out, reference, 1e-5)
        assert relative_error(out, module(x * 0.5, second)) > 1e-3


@pytest.mark.parametrize("mask_kind", [None, "additive", "bool"])
def test_mha_forms_agree_with_each_other(mask_kind):
    functional = one_site_model("mha_functional", mask_kind=mask_kind)
    module = one_site_model("mha_module", mask_kind=mask_kind)
    mha = module.model.get_submodule("blocks.0.attn")
    twin = functional.model.get_submodule("blocks.0.attn")
    with torch.no_grad():
        mha.in_proj_weight.copy_(twin.in_proj_weight)
        mha.in_proj_bias.copy_(twin.in_proj_bias)
        mha.out_proj.load_state_dict(twin.out_proj.state_dict())
    x = torch.randn(2, 6, 16)
    mask = None
    if mask_kind is not None:
        from lite3r_compile.testing.attention import mha_mask

        mask = mha_mask(mask_kind, 6, 6, x)
    expected = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    assert_close_rel(twin(x), expected, 1e-5)


def test_sites_of_a_single_view_model_are_self_scoped():
    generated = one_site_model("bmm", scope="frame", views=1)
    assert [s.scope for s in generated.sites] == ["self"]
    assert one_site_model("einsum", scope="cross", views=1).sites[0].scope == "cross"


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="not one of form"):
        AttentionSpec(form="sdpa", spelling="bmm")
    with pytest.raises(ValueError, match="additive float biases"):
        AttentionSpec(form="xformers", spelling="xformers", mask_kind="bool")
    with pytest.raises(ValueError, match="int_rope"):
        AttentionSpec(control="int_rope")
    with pytest.raises(ValueError, match="unknown spelling"):
        one_site_model("flash")


def test_xformers_stand_in_matches_sdpa_forward_and_backward():
    torch.manual_seed(0)
    q = torch.randn(2, 5, 3, 8, requires_grad=True)
    k = torch.randn(2, 7, 3, 8, requires_grad=True)
    v = torch.randn(2, 7, 3, 4, requires_grad=True)
    bias = torch.randn(2, 3, 5, 7)
    out = memory_efficient_attention(q, k, v, bias, scale=0.3)
    reference = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=0.3
    ).transpose(1, 2)
    assert out.shape == (2, 5, 3, 4)
    assert_close_rel(out, reference, 1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(reference.square().sum(), (q, k, v))
    assert_close_rel(grads, expected, 1e-5)
    meta = memory_efficient_attention(*(t.detach().to("meta") for t in (q, k, v)))
    assert meta.shape == (2, 5, 3, 4) and meta.device.type == "meta"


def test_xformers_stand_in_refuses_what_it_does_not_implement():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="additive float"):
        memory_efficient_attention(q, q, q, torch.ones(1, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="p=0.0"):
        memory_efficient_attention(q, q, q, p=0.1)
    with pytest.raises(ValueError, match=r"\(B, N, H, D\)"):
        memory_efficient_attention(q[0], q[0], q[0])


def test_xformers_stand_in_is_one_recognisable_node_in_fx_graphs():
    generated = one_site_model("xformers", mask_kind="additive")
    attention = generated.model.get_submodule("blocks.0.attn")
    graph = torch.fx.symbolic_trace(attention).graph
    hits = [n for n in graph.nodes if n.op == "call_function" and is_xformers_attention(n.target)]
    assert len(hits) == 1 and len(hits[0].args) == 6
    leaf_tracer = torch.fx.Tracer(autowrap_functions=(memory_efficient_attention,))
    leaf_hits = [n for n in leaf_tracer.trace(attention).nodes if n.target is memory_efficient_attention]
    assert len(leaf_hits) == 1 and is_xformers_attention(leaf_hits[0].target)
    assert not is_xformers_attention(torch.softmax) and not is_xformers_attention(torch.ops.aten.bmm.default)


def test_relative_error_is_normwise_and_checks_structure():
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.ones(3)}
    b = {"x": torch.tensor([1.0, 1e-3]), "y": torch.ones(3)}
    assert relative_error(a, b) == pytest.approx(1e-3, rel=1e-6)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    with pytest.raises(AssertionError, match="relative error"):
        assert_close_rel(a, b, 1e-5)
    with pytest.raises(ValueError, match="structure"):
        relative_error([torch.ones(1)], [torch.ones(1), torch.ones(1)])
    with pytest.raises(ValueError, match="shapes"):
        relative_error(torch.ones(2), torch.ones(3))


def test_generated_model_repr_is_its_description():
    generated = one_site_model("sdpa")
    assert repr(generated) == f"GeneratedModel(\n{generated.description}\n)"
    assert "blocks.0: global sdpa" in generated.description
    with pytest.raises(KeyError, match="no true attention site"):
        generated.site("blocks.9.attn")
    assert dataclasses.replace(generated.sites[0], scope="frame").scope == "frame"


@pytest.mark.parametrize(
    "spec",
    [
        AttentionSpec(form="sdpa", spelling="sdpa", control="shape_branch", layout="bnhd", qkv_source="chunk"),
        AttentionSpec(form="manual_scale_after", spelling="einsum", control="data_branch", mask_kind="bool"),
        AttentionSpec(form="manual_scale_q", spelling="scale_q", rope=True, control="int_rope"),
        AttentionSpec(form="mha_module", spelling="mha_module", qkv_source="in_proj", mask_kind="additive"),
        AttentionSpec(form="mha_functional", spelling="mha_functional", qkv_source="in_proj", mask_kind="bool"),
    ],
    ids=lambda spec: f"{spec.spelling}-{spec.control}",
)
def test_make_fx_captures_exactly_the_sites_that_say_so(spec):
    generated = build_architecture(ArchitectureSpec(views=2, blocks=(BlockSpec(scope="frame", attention=spec),)))
    (site,) = generated.sites
    args, kwargs = _site_inputs(generated)[site.path]
    module = generated.model.get_submodule(site.path)
    assert _make_fx_traces(module, args, kwargs) == (site.capture in ("symbolic_trace", "make_fx")), site


@pytest.mark.parametrize("control", ["data_branch", "int_rope"])
def test_dynamo_captures_what_make_fx_cannot(control):
    spec = AttentionSpec(form="xformers", spelling="xformers", layout="bnhd", rope=True, control=control)
    torch.manual_seed(0)
    module = SpelledAttention(16, spec)
    x, pos = torch.randn(2, 5, 16), torch.arange(5).expand(2, 5)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    try:
        out = torch.compile(module, backend=backend)(x, pos=pos)
    finally:
        torch._dynamo.reset()
    assert_close_rel(out, module(x, pos=pos), 1e-6)
    holders = [g for g in graphs if any(is_xformers_attention(n.target) for n in g.graph.nodes if n.op == "call_function")]
    assert len(graphs) >= 2 and len(holders) == 1  # a graph break, and the attention whole after it


@given(architectures(attention_controls=("shape_branch",), max_blocks=2))
def test_attention_controls_restriction(generated: GeneratedModel):
    assert all(site.capture in ("symbolic_trace", "make_fx") for site in generated.sites)


def test_two_view_decoder_needs_two_views():
    layer = TwoViewBlockSpec(self_attention=AttentionSpec(), cross_attention=AttentionSpec(qkv_source="separate", cross=True))
    with pytest.raises(ValueError, match="views == 2"):
        ArchitectureSpec(views=3, two_view_decoder=(layer,))
    generated = build_architecture(ArchitectureSpec(views=2, two_view_decoder=(layer,)))
    assert {(s.path, s.scope) for s in generated.sites} == {
        ("dec_blocks.0.attn", "frame"),
        ("dec_blocks.0.cross_attn", "cross"),
        ("dec_blocks2.0.attn", "frame"),
        ("dec_blocks2.0.cross_attn", "cross"),
    }
