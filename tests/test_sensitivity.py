"""Layer-wise FP8 sensitivity (lite3r_compile.sensitivity) and FP8Config.keep_high_precision."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from lite3r_compile import FP8Config, LiteConfig, SLAConfig, find_attention, lite, report
from lite3r_compile.models_zoo import create
from lite3r_compile.passes.fp8_qat import fake_quantize_e4m3
from lite3r_compile.sensitivity import block_globs, fp8_sensitivity, most_sensitive, relative_change


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create("vggt-tiny").eval()


@pytest.fixture(scope="module")
def measured(model):
    return fp8_sensitivity(model)


def _outputs(model, inputs):
    # every floating-point tensor of the output pytree (VGGT's pose_enc_list too) but the images
    with torch.no_grad():
        out = model(*inputs)
    leaves = torch.utils._pytree.tree_leaves(out)
    return [v for v in leaves if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not any(v is x for x in inputs)]


def test_one_entry_per_block_with_its_scope(model, measured):
    sites = find_attention(model)
    blocks = {s.path.rsplit(".", 1)[0]: s.scope for s in sites}
    # the heads keep their Linears by default: the aggregator's blocks, the DINOv2 ones inside
    # `aggregator.patch_embed` included
    assert [b.block for b in measured] == [b for b in blocks if b.startswith("aggregator.")]
    assert any(b.block.startswith("aggregator.patch_embed.blocks.") for b in measured)
    for b in measured:
        assert b.scope == blocks[b.block]
        assert b.layers and all(p.startswith(b.block + ".") for p in b.layers)
        assert math.isfinite(b.relative_change) and b.relative_change > 0


def test_change_equals_an_independent_weight_and_input_rounding(model, measured):
    # Round the chosen block's weights in a copy and its Linears' inputs with a pre-hook: the
    # same relative change as the measurement, and the measured model is left as it was.
    inputs = model.example_inputs()
    reference = _outputs(model, inputs)
    target = max(measured, key=lambda b: b.relative_change)
    changed = copy.deepcopy(model)
    for path in target.layers:
        linear = changed.get_submodule(path)
        with torch.no_grad():
            linear.weight.copy_(fake_quantize_e4m3(linear.weight, rowwise=True))
        linear.register_forward_pre_hook(lambda m, args: (fake_quantize_e4m3(args[0], rowwise=True),))
    expected = relative_change(reference, _outputs(changed, inputs))
    assert target.relative_change == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, inputs), reference))
    assert not any("forward" in vars(m) for m in model.modules())


def test_most_sensitive_orders_and_checks_the_budget(measured):
    top = most_sensitive(measured, 2)
    assert [b.relative_change for b in top] == sorted((b.relative_change for b in measured), reverse=True)[:2]
    assert most_sensitive(measured, 0) == []
    with pytest.raises(ValueError, match="keep_high_precision to at most"):
        most_sensitive(measured, len(measured) + 1)
    assert block_globs(top) == tuple(f"{b.block}.*" for b in top)


def test_relative_change_is_inf_for_non_finite_output():
    assert relative_change([torch.ones(3)], [torch.tensor([1.0, math.nan, 1.0])]) == math.inf
    assert relative_change([torch.ones(4)], [torch.full((4,), 2.0)]) == pytest.approx(1.0)


def test_lite_keeps_the_most_sensitive_blocks_in_high_precision(model, measured):
    config = LiteConfig(sla=SLAConfig(topk=1.0), fp8=FP8Config(keep_high_precision=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(model, backend="eager", config=config)
    # measured on the SLA student (topk=1: the same outputs as the dense model, so the same order)
    kept_layers = {p for b in most_sensitive(measured, 2) for p in b.layers}
    rows = {r.path: r for r in report(student).fp8_layers}
    for path in kept_layers:
        assert not rows[path].quantized and "FP8-sensitive" in rows[path].reason
        assert type(student.get_submodule(path)) is nn.Linear
    other_blocks = {p for b in measured for p in b.layers} - kept_layers
    assert other_blocks and all(rows[p].quantized for p in other_blocks)
    assert {p for p, r in rows.items() if "FP8-sensitive" in r.reason} == kept_layers


def test_keep_high_precision_rejects_a_bad_budget(model):
    with pytest.raises(ValueError, match="keep_high_precision must be an int >= 0"):
        FP8Config(keep_high_precision=-1)
    with pytest.raises(ValueError, match="cannot keep 99 transformer blocks"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lite(model, backend="eager", config=LiteConfig(fp8=FP8Config(keep_high_precision=99)))
