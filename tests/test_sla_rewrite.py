"""SLA rewrite: exactness at topk=1.0, state-dict keys, shape-generic students, MHA modules."""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from lite3r_compile.passes.attention import find_attention, locate_attention
from lite3r_compile.passes.attention_patterns import find_matches
from lite3r_compile.passes.sla_rewrite import (
    SLAMultiheadAttention,
    apply_sla,
    rewrite_attention,
)
from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.module import SparseLinearAttention
from lite3r_compile.testing import SPELLINGS, architectures, one_site_model, relative_error
from lite3r_compile.testing.architecture import example_inputs_for

DENSE = SLAConfig(topk=1.0)
ALL_SPELLINGS = [s for spellings in SPELLINGS.values() for s in spellings]


def _student(generated, config=DENSE):
    sites = find_attention(generated.model, generated.example_inputs)
    student = copy.deepcopy(generated.model)
    result = apply_sla(student, sites, lambda site: config)
    return student, result


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("spelling", ALL_SPELLINGS)
@pytest.mark.parametrize("layout,scope", [("bhnd", "global"), ("bnhd", "frame"), ("bhnd", "cross")])
def test_topk_one_student_equals_teacher(spelling, layout, scope):
    if spelling in SPELLINGS["mha_module"] + SPELLINGS["mha_functional"] and layout == "bnhd":
        layout = "bhnd"
    generated = one_site_model(spelling, scope=scope, layout=layout, custom_scale=spelling in (
        "sdpa_scale", "scale_q", "matmul_mul", "einsum", "baddbmm"))
    student, result = _student(generated)
    assert [s.rewritten for s in result] == [True]
    assert relative_error(_run(student, generated.example_inputs), _run(generated.model, generated.example_inputs)) < 1e-5
    (site,) = result
    owner = student.get_submodule(site.path)
    assert isinstance(owner.get_submodule("sla"), SparseLinearAttention)


@pytest.mark.parametrize("spelling", ["sdpa", "scale_q", "bmm", "einsum", "xformers", "mha_module", "mha_functional"])
def test_only_new_state_dict_keys_are_the_sla_projections(spelling):
    generated = one_site_model(spelling, scope="frame")
    before = set(generated.model.state_dict())
    student, result = _student(generated)
    path = result[0].path
    assert set(student.state_dict()) - before == {f"{path}.sla.proj_l.weight", f"{path}.sla.proj_l.bias"}
    assert before <= set(student.state_dict())
    student.load_state_dict(generated.model.state_dict(), strict=False)  # a teacher checkpoint loads


@pytest.mark.parametrize("spelling", ["sdpa", "matmul_mul", "bmm", "einsum", "baddbmm", "xformers", "mha_module"])
def test_student_works_for_other_numbers_of_views(spelling):
    generated = one_site_model(spelling, scope="global", views=2)
    student, _ = _student(generated)
    spec = dataclasses.replace(generated.spec, views=3, batch=2)
    torch.manual_seed(1)
    other = example_inputs_for(spec)
    assert relative_error(_run(student, other), _run(generated.model, other)) < 1e-5


def test_sparse_config_changes_the_output_and_teacher_is_untouched():
    generated = one_site_model("sdpa", scope="global", views=3, dim=16)
    expected = _run(generated.model, generated.example_inputs)
    student, _ = _student(generated, SLAConfig(topk=0.5, block_q=16, block_k=16))
    # the teacher is never modified: no sla submodule, same outputs
    assert not any(isinstance(m, SparseLinearAttention) for m in generated.model.modules())
    torch.testing.assert_close(_run(generated.model, generated.example_inputs), expected)
    assert any(isinstance(m, SparseLinearAttention) for m in student.modules())


def test_config_none_and_masked_sites_stay_dense():
    generated = one_site_model("matmul_mul", scope="frame", mask_kind="additive")
    sites = find_attention(generated.model, generated.example_inputs)
    student = copy.deepcopy(generated.model)
    (site,) = apply_sla(student, sites, lambda s: DENSE)
    assert not site.rewritten and "mask" in site.reason
    generated = one_site_model("sdpa", scope="frame")
    sites = find_attention(generated.model, generated.example_inputs)
    student = copy.deepcopy(generated.model)
    (site,) = apply_sla(student, sites, lambda s: None)
    assert not site.rewritten and site.rewritable
    assert not any(isinstance(m, SparseLinearAttention) for m in student.modules())


def test_multihead_attention_module_keeps_parameter_names():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    replacement = SLAMultiheadAttention(mha, DENSE)
    assert set(replacement.state_dict()) == set(mha.state_dict()) | {"sla.proj_l.weight", "sla.proj_l.bias"}
    assert replacement.in_proj_weight is mha.in_proj_weight
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(replacement(x, y, y)[0], mha(x, y, y, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="masks"):
        replacement(x, x, x, attn_mask=torch.zeros(5, 5))


def test_rewrite_attention_on_a_graph_module():
    generated = one_site_model("einsum", scope="frame", layout="bnhd")
    analysis = locate_attention(generated.model, generated.example_inputs)
    (site,) = analysis.sites
    gm = site.capture.module.graph_module
    result = rewrite_attention(gm, find_matches(gm), DENSE)
    assert len(result.rewritten) == 1 and not result.skipped
    assert "sla" in dict(gm.named_children())
    assert not any(n.target == "softmax" or getattr(n.target, "__name__", "") == "einsum" for n in gm.graph.nodes)


def test_vggt_tiny_sites_and_student_equals_teacher():
    from lite3r_compile import models_zoo

    teacher = models_zoo.create("vggt-tiny").eval()
    inputs = teacher.example_inputs()
    sites = find_attention(teacher, inputs)
    counts = collections.Counter((".".join(s.path.split(".")[:2]), s.scope, s.form) for s in sites)
    depth = len(teacher.aggregator.frame_blocks)
    assert counts[("aggregator.frame_blocks", "frame", "sdpa")] == depth
    assert counts[("aggregator.global_blocks", "global", "sdpa")] == depth
    assert counts[("aggregator.patch_embed", "frame", "sdpa")] == len(teacher.aggregator.patch_embed.blocks)
    assert counts[("camera_head.trunk", "self", "sdpa")] == len(teacher.camera_head.trunk)
    mha = [m for m in teacher.track_head.modules() if isinstance(m, nn.MultiheadAttention)]
    assert sum(v for k, v in counts.items() if k[2] == "multihead_attention") == len(mha) > 0

    student = copy.deepcopy(teacher)
    result = apply_sla(student, sites, lambda s: DENSE)
    assert all(s.rewritten for s in result) and len(result) == len(sites) > 0
    new_keys = set(student.state_dict()) - set(teacher.state_dict())
    assert new_keys == {f"{s.path}.{s.sla_name}.proj_l.{p}" for s in result for p in ("weight", "bias")}
    assert relative_error(_run(student, inputs), _run(teacher, inputs)) < 1e-5


@settings(max_examples=10)
@given(architectures(max_blocks=2, max_decoder_blocks=1))
def test_generated_architectures_topk_one_is_exact(generated):
    student, result = _student(generated)
    for site in result:
        assert site.rewritten == site.rewritable, site
    error = relative_error(_run(student, generated.example_inputs), _run(generated.model, generated.example_inputs))
    assert error < 1e-5, generated.description


class TemperatureAttention(nn.Module):
    """A learned per-head temperature on the scores, a plain tensor attribute as scale, and a
    nested child used directly (``self.out[0]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.temperature = nn.Parameter(torch.tensor([0.5, 2.0]).reshape(2, 1, 1))
        self.bias_free_scale = torch.tensor(0.7)
        self.out = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-2, -1)) * self.temperature * self.bias_free_scale
        out = scores.softmax(dim=-1) @ v
        return self.out[0](out.transpose(1, 2).reshape(B, N, C))


def test_tensor_scale_factors_fold_into_q_and_keep_the_state_dict():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = TemperatureAttention()

        def forward(self, x):
            return self.attn(x)

    teacher, x = Net(), torch.randn(2, 5, 16)
    (site,) = find_attention(teacher, (x,))
    assert site.rewritable, site.reason
    student = copy.deepcopy(teacher)
    apply_sla(student, [site], lambda s: DENSE)
    assert set(student.state_dict()) - set(teacher.state_dict()) == {"attn.sla.proj_l.weight", "attn.sla.proj_l.bias"}
    assert set(teacher.state_dict()) <= set(student.state_dict())
    assert relative_error(_run(student, (x,)), _run(teacher, (x,))) < 1e-5


def test_student_pickles_whole():
    import io

    generated = one_site_model("matmul_mul", scope="frame")
    student, _ = _student(generated)
    buffer = io.BytesIO()
    torch.save(student, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_run(loaded, generated.example_inputs), _run(student, generated.example_inputs))
