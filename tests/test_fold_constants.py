"""Folding the input-independent computations of a graph (``backends/fold_constants.py``): what is
folded, what must never be, and that the compiled model computes the same thing either way."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx
from torch import nn

from lite3r_compile.backends.fold_constants import FoldConfig, fold_input_independent
from lite3r_compile.backends.registration import (
    compile_reports,
    lite3r_backend,
)
from lite3r_compile.models_zoo.dpt import DPTHead


pytestmark = pytest.mark.usefixtures("fresh_lite3r_backend")


def _embedding(n: int) -> torch.Tensor:
    """A shape-only sin/cos table in float64, as the DPT heads build theirs."""
    omega = 1.0 / 100 ** (torch.arange(n, dtype=torch.float64) / n)
    return torch.cat([torch.sin(omega), torch.cos(omega)]).float()


class AddsEmbedding(nn.Module):
    def forward(self, x):
        return x + _embedding(x.shape[-1] // 2)


class AddsTwoEqualEmbeddings(nn.Module):
    def forward(self, x):
        return (x + _embedding(x.shape[-1] // 2)) * _embedding(x.shape[-1] // 2)


def _compiled(model, *, compiler="eager", dynamic=False, **options):
    backend = functools.partial(lite3r_backend, options={"sla": False, "fp8": False, "compiler": compiler,
                                                         **options})
    return torch.compile(model, backend=backend, dynamic=dynamic)


def _dynamo_graph(fn, *args) -> fx.GraphModule:
    """The graph Dynamo captures of ``fn(*args)``, before any backend pass."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture)(*args)
    (gm,) = graphs
    return gm


def _ops(gm: fx.GraphModule) -> list[str]:
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op.startswith("call")]


def test_a_shape_only_table_is_computed_once_and_read_from_a_buffer():
    x = torch.randn(3, 16)
    out = _compiled(AddsEmbedding())(x)
    torch.testing.assert_close(out, AddsEmbedding()(x), rtol=0, atol=0)
    (report,) = compile_reports()
    (constant,) = report.folded.folded
    assert constant.shape == (16,) and constant.dtype == torch.float32 and constant.nbytes == 64
    assert report.folded.removed_nodes > 5


def test_the_folded_graph_no_longer_computes_the_table():
    x = torch.randn(2, 16)
    gm = _dynamo_graph(AddsEmbedding(), x)
    assert "sin" in _ops(gm)
    report = fold_input_independent(gm)
    assert len(report.folded) == 1
    assert "sin" not in _ops(gm) and "cos" not in _ops(gm) and "arange" not in _ops(gm)
    (out,) = gm(x)
    torch.testing.assert_close(out, x + _embedding(8), rtol=0, atol=0)


def test_equal_values_share_one_buffer():
    x = torch.randn(2, 16)
    out = _compiled(AddsTwoEqualEmbeddings())(x)
    torch.testing.assert_close(out, AddsTwoEqualEmbeddings()(x), rtol=0, atol=0)
    folded = compile_reports()[0].folded
    assert len(folded.folded) == 2 and len({c.buffer for c in folded.folded}) == 1
    assert folded.folded_bytes == 64


def test_random_values_are_never_frozen():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand(x.shape[-1]) * _embedding(x.shape[-1] // 2)

    f = _compiled(Noisy())
    x = torch.zeros(1, 16)
    assert not torch.equal(f(x), f(x))
    (constant,) = compile_reports()[0].folded.folded  # the table is folded, the noise is not
    assert constant.shape == (16,)


def test_values_computed_from_parameters_follow_the_parameters():
    class FromWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0, 1, 8))

        def forward(self, x):
            return x + torch.sin(self.w)

    model = FromWeight()
    f = _compiled(model)
    x = torch.zeros(8)
    with torch.no_grad():
        f(x)
        model.w.add_(1.0)
        torch.testing.assert_close(f(x), torch.sin(model.w))
    assert not compile_reports()[0].folded.folded


def test_index_arithmetic_is_left_to_the_compiler():
    class Strided(nn.Module):
        def forward(self, x):
            return x[..., torch.arange(0, x.shape[-1], 2) + 1] + torch.arange(x.shape[-1] // 2) * 0.5

    x = torch.randn(2, 16)
    torch.testing.assert_close(_compiled(Strided())(x), Strided()(x))
    assert compile_reports()[0].folded.constants == []


@pytest.mark.parametrize("through_a_view", [False, True])
def test_in_place_updates_stop_the_fold(through_a_view):
    class InPlace(nn.Module):
        def forward(self, x):
            t = torch.zeros(x.shape[-1])
            (t.view(2, -1) if through_a_view else t).add_(2.0)
            return x + torch.sin(t)

    x = torch.randn(2, 8)
    torch.testing.assert_close(_compiled(InPlace())(x), InPlace()(x))
    assert not compile_reports()[0].folded.folded


def test_symbolic_sizes_are_inputs_not_constants():
    f = _compiled(AddsEmbedding(), dynamic=True)
    for width in (16, 24, 32):
        x = torch.randn(2, width)
        torch.testing.assert_close(f(x), AddsEmbedding()(x), rtol=0, atol=0)
    assert all(not r.folded.folded for r in compile_reports())


def test_a_value_over_the_budget_stays_computed_and_is_reported():
    x = torch.randn(128)
    gm = _dynamo_graph(AddsEmbedding(), x)
    report = fold_input_independent(gm, FoldConfig(max_bytes=256))
    (constant,) = report.constants
    assert constant.skipped and "max_bytes" in constant.skipped and constant.nbytes == 512
    assert "sin" in _ops(gm)
    (out,) = gm(x)
    torch.testing.assert_close(out, x + _embedding(64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_bytes"):
        FoldConfig(max_bytes=-1)


def test_grad_mode_switches_and_gradients_survive():
    class NoGradTable(nn.Module):
        def forward(self, x):
            with torch.no_grad():
                table = _embedding(x.shape[-1] // 2)
            return (x * table).sum()

    x = torch.randn(3, 16, requires_grad=True)
    _compiled(NoGradTable())(x).backward()
    assert compile_reports()[0].folded.folded
    torch.testing.assert_close(x.grad, _embedding(8).expand(3, 16))


def test_off_means_nothing_is_folded():
    _compiled(AddsEmbedding(), fold_constants=False)(torch.randn(2, 16))
    assert compile_reports()[0].folded is None


def _dpt_head():
    torch.manual_seed(0)
    return DPTHead(64, features=32, out_channels=(16, 32, 64, 64), intermediate_layer_idx=(0, 1, 2, 3)).eval()


def _dpt_inputs():
    torch.manual_seed(1)
    return [torch.randn(1, 4, 5 + 16, 64) for _ in range(4)], torch.randn(1, 4, 3, 56, 56)


def test_the_dpt_heads_pixel_embeddings_are_folded_once_for_every_chunk():
    head, (tokens, images) = _dpt_head(), _dpt_inputs()
    run = functools.partial(head, patch_start_idx=5, frames_chunk_size=2)
    with torch.no_grad():
        expected = run(tokens, images)
        got = _compiled(run)(tokens, images)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    folded = compile_reports()[0].folded
    # four pyramid levels and the output, for each of the two chunks; one buffer per distinct value
    assert len(folded.folded) == 10
    assert {c.shape for c in folded.folded} >= {(1, 16, 56, 56)}
    assert len({c.buffer for c in folded.folded}) == 4


def test_through_inductor_the_pass_folds_the_aten_graph():
    head, (tokens, images) = _dpt_head(), _dpt_inputs()
    run = functools.partial(head, patch_start_idx=5, frames_chunk_size=2)
    with torch.no_grad(), torch._inductor.utils.fresh_cache():
        expected = run(tokens, images)
        got = _compiled(run, compiler="inductor")(tokens, images)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    folded = compile_reports()[0].folded
    assert folded is not None and folded.folded
    assert any(c.shape == (1, 16, 56, 56) for c in folded.folded)


def test_a_post_grad_pass_the_user_set_still_runs_before_the_fold():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Counting(CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            Counting.calls += 1

        def uuid(self):
            return b"counting"

    x = torch.randn(2, 16)
    with torch._inductor.config.patch(post_grad_custom_pre_pass=Counting()), torch._inductor.utils.fresh_cache():
        out = _compiled(AddsEmbedding(), compiler="inductor")(x)
    torch.testing.assert_close(out, AddsEmbedding()(x))
    assert Counting.calls == 1 and compile_reports()[0].folded.folded


@pytest.mark.gpu
def test_on_a_gpu_with_cuda_graphs_the_folded_head_matches_eager():
    head = _dpt_head().cuda().to(torch.bfloat16)
    tokens, images = _dpt_inputs()
    tokens, images = [t.cuda().to(torch.bfloat16) for t in tokens], images.cuda().to(torch.bfloat16)
    run = functools.partial(head, patch_start_idx=5, frames_chunk_size=2)
    with torch.no_grad(), torch._inductor.utils.fresh_cache():
        expected = run(tokens, images)
        compiled = _compiled(run, compiler="inductor", cuda_graphs=True)
        for _ in range(3):  # record, then replay
            got = compiled(tokens, images)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    folded = compile_reports()[0].folded
    assert folded is not None and any(c.shape == (1, 16, 56, 56) for c in folded.folded)
