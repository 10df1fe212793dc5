"""The freeze pass, the pass manager's ordering, and the configuration objects."""

from __future__ import annotations

import pytest
from torch import nn

from lite3r_compile.config import FP8Config, LiteConfig
from lite3r_compile.passes.freeze import freeze, trainable_names
from lite3r_compile.passes.manager import Pass, PassResult, order_passes, run_passes
from lite3r_compile.sla.config import SLAConfig
from lite3r_compile.sla.module import SparseLinearAttention


class _WithSLA(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"sla": SparseLinearAttention(4), "norm": nn.LayerNorm(16)}) for _ in range(2))
        self.head = nn.Linear(16, 3)


def test_only_proj_l_stays_trainable():
    model = _WithSLA()
    result = freeze(model, LiteConfig())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"blocks.{i}.sla.proj_l.{w}" for i in range(2) for w in ("weight", "bias")
    )
    summary = result.artifacts["freeze"]
    assert summary.trainable_numel == 2 * (4 * 4 + 4)
    assert summary.frozen_numel == sum(p.numel() for p in model.parameters()) - summary.trainable_numel
    assert result.notes == []


def test_trainable_globs_widen_the_set_and_unmatched_globs_are_reported():
    model = _WithSLA()
    result = freeze(model, LiteConfig(trainable=("head.*", "nothing.here")))
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    assert not model.embed.weight.requires_grad
    assert any("nothing.here" in n for n in result.notes)


def test_freeze_without_sla_says_nothing_is_trainable():
    model = nn.Sequential(nn.Linear(4, 4))
    result = freeze(model, LiteConfig())
    assert not any(p.requires_grad for p in model.parameters())
    assert any("no parameter is trainable" in n for n in result.notes)
    assert trainable_names(model, LiteConfig()) == set()


def _pass(name, requires=(), provides=(), after=(), log=None):
    def fn(module, config, **inputs):
        log.append((name, sorted(inputs)))
        return PassResult(name, {a: f"{name}:{a}" for a in provides})

    return Pass(name, fn, requires, provides, after)


def test_manager_orders_by_requirements_and_keeps_declaration_order_on_ties():
    log = []
    passes = [
        _pass("freeze", after=("fp8", "rewrite"), provides=("frozen",), log=log),
        _pass("fp8", requires=("sites",), provides=("layers",), after=("rewrite",), log=log),
        _pass("rewrite", requires=("sites",), provides=("rewritten",), log=log),
        _pass("find", requires=("inputs",), provides=("sites",), log=log),
    ]
    assert [p.name for p in order_passes(passes, ["inputs"])] == ["find", "rewrite", "fp8", "freeze"]
    record = run_passes(nn.Identity(), LiteConfig(), passes, seeded={"inputs": 1})
    assert log == [("find", ["inputs"]), ("rewrite", ["sites"]), ("fp8", ["sites"]), ("freeze", [])]
    assert record.artifacts["layers"] == "fp8:layers" and record.artifacts["inputs"] == 1
    assert [r.name for r in record.results] == ["find", "rewrite", "fp8", "freeze"]


def test_manager_errors_name_the_pass():
    with pytest.raises(ValueError, match="'b' requires 'x', which no pass provides"):
        order_passes([_pass("b", requires=("x",), log=[])])
    with pytest.raises(ValueError, match="cycle"):
        order_passes([_pass("a", requires=("y",), provides=("x",), log=[]),
                      _pass("b", requires=("x",), provides=("y",), log=[])])
    with pytest.raises(ValueError, match="provided by both 'a' and 'b'"):
        order_passes([_pass("a", provides=("x",), log=[]), _pass("b", provides=("x",), log=[])])
    with pytest.raises(ValueError, match="unknown pass 'zz'"):
        order_passes([_pass("a", after=("zz",), log=[])])
    liar = Pass("liar", lambda m, c: PassResult("liar"), provides=("x",))
    with pytest.raises(RuntimeError, match="'liar' declared"):
        run_passes(nn.Identity(), LiteConfig(), [liar])


def test_configs_validate_and_coerce():
    config = LiteConfig(sla_include=["a.*"], trainable="head.*", fp8=FP8Config(exclude=["x"]))
    assert config.sla_include == ("a.*",) and config.trainable == ("head.*",)
    assert config.fp8.exclude == ("x",)
    with pytest.raises(ValueError, match="granularity"):
        FP8Config(granularity="blockwise")
    with pytest.raises(ValueError, match="unknown scopes"):
        LiteConfig(sla_scopes=("frame", "temporal"))
    with pytest.raises(TypeError, match="SLAConfig"):
        LiteConfig(sla=FP8Config())
    with pytest.raises(TypeError, match="sla_overrides"):
        LiteConfig(sla_overrides=(("x.*", 0.5),))
    with pytest.raises(Exception):
        config.sla = SLAConfig()  # frozen


def test_sla_for_applies_scopes_globs_and_overrides():
    fast = SLAConfig(topk=0.05)
    config = LiteConfig(
        sla_scopes=("global", "frame"),
        sla_exclude=("*.frame_blocks.0.*",),
        sla_overrides=(("*.global_blocks.*", fast),),
    )
    assert config.sla_for("agg.global_blocks.3.attn", "global")[0] is fast
    assert config.sla_for("agg.frame_blocks.3.attn", "frame")[0] is config.sla
    sla, why = config.sla_for("agg.frame_blocks.0.attn", "frame")
    assert sla is None and "sla_exclude" in why
    sla, why = config.sla_for("head.attn", "cross")
    assert sla is None and "'cross'" in why
    sla, why = LiteConfig(sla_include=("agg.*",)).sla_for("head.attn", "self")
    assert sla is None and "sla_include" in why
