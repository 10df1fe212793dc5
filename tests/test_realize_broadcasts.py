"""Giving a buffer to the transcendentals a broadcasting kernel would recompute per copy
(``backends/realize_broadcasts.py``): what is realized, what is not, and that the compiled model
computes exactly what it did before."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from lite3r_compile.backends.fold_constants import FoldConstantsPass
from lite3r_compile.backends.realize_broadcasts import (
    RealizeBroadcastsPass,
    RealizeConfig,
    realize_broadcast_values,
)
from lite3r_compile.backends.registration import (
    compile_reports,
    lite3r_backend,
)
from lite3r_compile.models_zoo.layers import RotaryPositionEmbedding2D

FORCE = torch.ops.prims.inductor_force_stride_order.default


pytestmark = pytest.mark.usefixtures("fresh_lite3r_backend")


class NormThenRope(nn.Module):
    """VGGT's qk-norm then 2D RoPE: cos/sin of (B, 1, N, D/4) broadcast over the heads."""

    def __init__(self, head_dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(head_dim, elementwise_affine=False)  # no parameters: make_fx traces it fake
        self.rope = RotaryPositionEmbedding2D(100.0)

    def forward(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.rope(self.norm(q), positions)


def _rope_inputs(batch=2, heads=8, tokens=24, head_dim=16, dtype=torch.float32):
    q = torch.randn(batch, heads, tokens, head_dim, dtype=dtype)
    return q, torch.randint(0, 5, (batch, tokens, 2))


def _aten_graph(fn, *args, tracing_mode="fake"):
    return make_fx(fn, tracing_mode=tracing_mode)(*args)


def _forced(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is FORCE]


def test_rope_cos_and_sin_get_a_buffer_each_with_the_head_count_as_expansion():
    q, positions = _rope_inputs(heads=8)
    gm = _aten_graph(NormThenRope().eval(), q, positions)
    realized = realize_broadcast_values(gm)
    # the angle tables, and (unfolded in this graph) the frequency ladder behind them
    tables = [r for r in realized if r.op in ("cos", "sin")]
    assert sorted(r.op for r in tables) == ["cos", "cos", "sin", "sin"]
    assert all(r.expansion == 8 and r.shape == (2, 1, 24, 8) for r in tables)
    assert {r.op for r in realized} <= {"cos", "sin", "pow"}
    forced = _forced(gm)
    assert len(forced) == len(realized)
    for node in forced:
        (source, _), = [node.args]
        assert source.target in (torch.ops.aten.cos.default, torch.ops.aten.sin.default, torch.ops.aten.pow.Scalar)
        assert list(source.users) == [node]  # every other reader now reads the buffer
    assert realize_broadcast_values(gm) == []  # idempotent


def test_the_realized_graph_computes_the_same_values():
    model = NormThenRope().eval()
    q, positions = _rope_inputs()
    gm = _aten_graph(model, q, positions)
    expected = gm(q, positions)
    realize_broadcast_values(gm)
    torch.testing.assert_close(gm(q, positions), expected, rtol=0, atol=0)


def test_values_read_element_for_element_or_barely_broadcast_stay_inlined():
    def same_size(x):
        return torch.exp(x) * x + torch.erf(x)

    def broadcast_twice(x, y):  # x (B, 1, N), y (B, 2, N): expansion 2 < min_expansion 4
        return torch.sin(x) * y

    def cheap_broadcast(x, y):  # a product is no transcendental: Inductor inlines it for free
        return (x * 3.0) * y

    assert realize_broadcast_values(_aten_graph(same_size, torch.randn(4, 32))) == []
    assert realize_broadcast_values(_aten_graph(broadcast_twice, torch.randn(2, 1, 8), torch.randn(2, 2, 8))) == []
    assert realize_broadcast_values(_aten_graph(cheap_broadcast, torch.randn(2, 1, 8), torch.randn(2, 16, 8))) == []
    gm = _aten_graph(broadcast_twice, torch.randn(2, 1, 8), torch.randn(2, 2, 8))
    assert [r.op for r in realize_broadcast_values(gm, RealizeConfig(min_expansion=2))] == ["sin"]


def test_a_broadcast_reached_through_views_and_a_cat_counts():
    def through_views(angles, tokens):  # angles (B, N, D/2) -> cat -> (B, 1, N, D) -> * (B, H, N, D)
        table = torch.cat((angles, angles), dim=-1).cos()[:, None]
        return tokens * table

    gm = _aten_graph(through_views, torch.randn(2, 10, 4), torch.randn(2, 16, 10, 8))
    realized = realize_broadcast_values(gm)
    assert [r.op for r in realized] == ["cos"] and realized[0].expansion == 16


def test_symbolic_shapes_are_handled_and_the_expansion_is_proven_not_guessed():
    def rope_like(angles, tokens):  # every input size symbolic; the head count a constant of the graph
        return tokens * torch.cos(angles).expand(-1, 16, -1, -1)

    gm = _aten_graph(rope_like, torch.randn(3, 1, 10, 8), torch.randn(3, 16, 10, 8), tracing_mode="symbolic")
    realized = realize_broadcast_values(gm)
    assert [r.op for r in realized] == ["cos"] and realized[0].expansion == 16
    torch.testing.assert_close(gm(torch.ones(5, 1, 7, 8), torch.ones(5, 16, 7, 8)),
                               torch.ones(5, 16, 7, 8) * torch.cos(torch.ones(())))

    def unknown_ratio(angles, tokens):  # (B, 1, N, D) * (B, H, N, D) with H symbolic: H >= 4 unprovable
        return tokens * torch.cos(angles)

    gm = _aten_graph(unknown_ratio, torch.randn(3, 1, 10, 8), torch.randn(3, 5, 10, 8), tracing_mode="symbolic")
    assert realize_broadcast_values(gm) == []


def test_min_expansion_below_two_is_refused():
    with pytest.raises(ValueError, match="min_expansion"):
        RealizeConfig(min_expansion=1)


def _compiled(model, **options):
    backend = functools.partial(lite3r_backend, options={"sla": False, "fp8": False, **options})
    return torch.compile(model, backend=backend)


def _buffer_shapes(code: str) -> list[str]:
    return re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_through_inductor_the_tables_are_buffers_and_the_output_is_unchanged(dtype):
    from torch._inductor.utils import fresh_cache, run_and_get_code

    model = NormThenRope().to(dtype).eval()
    q, positions = _rope_inputs(dtype=dtype)
    with torch.no_grad(), fresh_cache():
        expected = model(q, positions)
        inlined, inlined_code = run_and_get_code(_compiled(model, realize_broadcasts=False), q, positions)
        assert compile_reports()[-1].realized == []
        torch._dynamo.reset()
        realized, realized_code = run_and_get_code(_compiled(model), q, positions)
    report = compile_reports()[-1]
    assert sorted(r.op for r in report.realized) == ["cos", "cos", "sin", "sin"]
    # the (B, 1, N, D/4) tables are written to memory only when realized
    table = "2, 1, 24, 8"
    assert _buffer_shapes(realized_code[0]).count(table) == 4
    assert table not in _buffer_shapes(inlined_code[0])
    # bit for bit: the buffer holds the value the inlined code rounded to
    torch.testing.assert_close(realized, inlined, rtol=0, atol=0)
    torch.testing.assert_close(realized.float(), expected.float(), rtol=1e-2 if dtype is torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype is torch.bfloat16 else 1e-5)


def test_with_dynamic_frames_the_tables_are_still_realized_and_correct():
    from torch._inductor.utils import fresh_cache

    model = NormThenRope().eval()
    compiled = _compiled(model)
    with torch.no_grad(), fresh_cache():
        for batch in (2, 3, 5):
            q, positions = _rope_inputs(batch=batch)
            torch._dynamo.mark_dynamic(q, 0)
            torch._dynamo.mark_dynamic(positions, 0)
            torch.testing.assert_close(compiled(q, positions), model(q, positions), rtol=1e-5, atol=1e-5)
    assert len(compile_reports()) == 1
    assert sorted(r.op for r in compile_reports()[0].realized) == ["cos", "cos", "sin", "sin"]


def test_the_chain_keeps_a_user_pass_and_keys_the_cache_on_every_member():
    calls = []

    def plain(graph):  # a plain function: Inductor cannot key it
        calls.append("plain")

    chained = RealizeBroadcastsPass(after=FoldConstantsPass(after=plain))
    assert chained.uuid() is None
    assert RealizeBroadcastsPass().uuid() != RealizeBroadcastsPass(RealizeConfig(min_expansion=8)).uuid()
    assert RealizeBroadcastsPass().uuid() != RealizeBroadcastsPass(after=FoldConstantsPass()).uuid()
    gm = _aten_graph(lambda a, t: t * torch.cos(a), torch.randn(2, 1, 4), torch.randn(2, 8, 4))
    seen = []
    RealizeBroadcastsPass(on_realize=seen.extend, after=FoldConstantsPass(after=plain))(gm.graph)
    assert calls == ["plain"] and [r.op for r in seen] == ["cos"]
