"""ModuleWatch: the per-call check of a student's tensors and hooks agrees with a full walk."""

from __future__ import annotations

import torch
from torch import nn

from lite3r_compile.backends.module_watch import ModuleWatch


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 8), nn.GELU()))
    model.register_buffer("offset", torch.zeros(8))
    return model


def fresh(model: nn.Module):
    return ModuleWatch(model).look()


def test_a_watch_sees_every_kind_of_change_a_fresh_walk_sees():
    model = make_model()
    watch = ModuleWatch(model)
    before = watch.look()
    assert watch.look() == before == fresh(model) and not before.hooked

    changes = [
        ("in-place write", lambda: model[0].weight.add_(1.0), "versions"),
        (".data re-pointed", lambda: setattr(model[0].weight, "data", torch.ones(8, 4)), "structure"),
        ("Parameter set through _parameters", lambda: model[1]._parameters.__setitem__(
            "bias", nn.Parameter(torch.ones(8))), "structure"),
        ("module swapped through _modules", lambda: model[2]._modules.__setitem__("0", nn.Linear(8, 8)),
         "structure"),
        ("buffer registered", lambda: model[1].register_buffer("extra", torch.zeros(1)), "structure"),
        ("dtype", lambda: model.double(), "structure"),
    ]
    for what, change, field in changes:
        last = watch.look()
        with torch.no_grad():
            change()
        now = watch.look()
        assert now == fresh(model), what
        assert getattr(now, field) != getattr(last, field), what
        if field == "versions":
            assert now.structure == last.structure, what


def test_hooks_on_submodules_are_seen_and_the_module_s_own_are_not():
    model = make_model()
    watch = ModuleWatch(model)
    own = model.register_forward_hook(lambda *a: None)
    assert not watch.look().hooked
    handle = model[2][1].register_forward_pre_hook(lambda *a: None)
    assert watch.look().hooked
    handle.remove()
    own.remove()
    assert not watch.look().hooked
