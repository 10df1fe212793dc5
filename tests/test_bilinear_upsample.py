"""``lite3r::upsample_bilinear2d`` (``backends/bilinear_upsample.py``) and the Dynamo-graph pass
that routes bilinear ``F.interpolate`` calls to it (``backends/graph_upsample.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lite3r_compile.backends.bilinear_upsample import (
    interpolate_bilinear,
    is_channels_last,
    upsample_bilinear2d,
    upsample_bilinear_reference,
)
from lite3r_compile.backends.graph_upsample import UpsampleConfig, route_bilinear_upsamples
from lite3r_compile.backends.registration import (
    compile_reports,
    lite3r_backend,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


pytestmark = pytest.mark.usefixtures("fresh_lite3r_backend")


resizes = st.tuples(
    st.integers(1, 3), st.integers(1, 9), st.integers(1, 7), st.integers(1, 7),  # N, C, H, W
    st.booleans(),  # size or scale_factor
    st.tuples(st.integers(1, 13), st.integers(1, 13)),
    st.sampled_from([0.5, 1.0, 1.7, 2.0, 3.0]),
    st.sampled_from([True, False, None]),  # align_corners
    st.booleans(),  # channels-last input
)


@settings(max_examples=40, deadline=None)
@given(resizes)
def test_interpolate_bilinear_is_f_interpolate(case):
    n, c, h, w, by_size, out_hw, factor, align_corners, channels_last = case
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = {"size": out_hw} if by_size else {"scale_factor": factor}
    assume(by_size or min(int(h * factor), int(w * factor)) >= 1)  # F.interpolate refuses empty outputs
    want = F.interpolate(x, mode="bilinear", align_corners=align_corners, **args)
    got = interpolate_bilinear(x, align_corners=align_corners, **args)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-6
    # the routed form computes in channels-last, whatever the input's layout
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_output_keeps_the_input_memory_format_and_the_op_passes_opcheck():
    x = torch.randn(2, 6, 5, 4)
    assert upsample_bilinear2d(x, [9, 7], True).is_contiguous()
    xl = x.contiguous(memory_format=torch.channels_last)
    assert is_channels_last(xl) and not is_channels_last(x)
    assert is_channels_last(upsample_bilinear2d(xl, [9, 7], True))
    for sample in (x, xl):
        torch.library.opcheck(upsample_bilinear2d, (sample, [9, 7], True, None, None))
        torch.library.opcheck(upsample_bilinear2d, (sample, [10, 8], False, 2.0, 2.0))
        # with a gradient, all but dynamic-shape AOT tracing: ATen's upsample_bilinear2d_backward
        # has no symbolic-size meta kernel, which is why the pass routes inference graphs only
        torch.library.opcheck(upsample_bilinear2d, (sample.clone().requires_grad_(), [9, 7], True, None, None),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_static"))


def test_gradient_is_f_interpolates():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: upsample_bilinear2d(t, [7, 9], True), (x,))
    got = torch.autograd.grad(interpolate_bilinear(x, scale_factor=2, align_corners=False).square().sum(), x)[0]
    want = torch.autograd.grad(F.interpolate(x, scale_factor=2, mode="bilinear").square().sum(), x)[0]
    assert (got - want).abs().max() < 1e-12


_INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from lite3r_compile.backends.bilinear_upsample import upsample_bilinear_triton
    torch.manual_seed(0)
    cases = [((2, 5, 3, 4), (7, 9), True, None), ((1, 24, 4, 4), (8, 8), False, 2.0),
             ((1, 3, 5, 7), (8, 11), False, 1.7), ((2, 4, 1, 1), (3, 3), True, None),
             ((1, 2, 6, 6), (3, 3), False, 0.5), ((1, 130, 3, 3), (5, 5), True, None)]
    for shape, size, align, scale in cases:
        for dtype in (torch.float32, torch.float16):
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
                kwargs = {"scale_factor": scale} if scale else {"size": size}
                want = F.interpolate(x.float(), mode="bilinear", align_corners=align, **kwargs).to(dtype)
                got = upsample_bilinear_triton(x, size, align, scale, scale)
                tol = 1e-6 if dtype == torch.float32 else 1e-3
                err = (got.float() - want.float()).abs().max().item()
                assert err <= tol, (shape, size, align, scale, dtype, layout, err)
                assert got.dtype == dtype
                assert got.is_contiguous(memory_format=layout) or min(shape[1:]) == 1
    print("ok")
""")


def test_triton_kernel_under_the_interpreter_matches_f_interpolate():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


class FusionLike(nn.Module):
    """A DPT fusion step: conv + skip, ReLU, bilinear 2x, 1x1 conv; then a resize to a size
    another input gives, and one that must stay (nearest)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x) + x)
        y = self.out_conv(F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True))
        y = F.interpolate(y, size=like.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(y, scale_factor=2, mode="nearest")


def test_backend_routes_bilinear_calls_and_matches_eager_with_dynamic_batch():
    torch.manual_seed(0)
    model = FusionLike().eval()
    compiled = torch.compile(model, backend=lite3r_backend, options={"compiler": "eager"})
    for batch in (2, 3, 4):
        x, like = torch.randn(batch, 16, 5, 6), torch.randn(1, 1, 13, 11)
        with torch.no_grad():
            assert (compiled(x, like) - model(x, like)).abs().max() < 1e-5
    reports = compile_reports()
    assert len(reports) == 2  # static, then dynamic in the batch
    report = reports[-1]
    assert [(u.mode, u.routed) for u in report.upsamples] == [("bilinear", True), ("bilinear", True),
                                                              ("nearest", False)]
    assert "mode 'nearest'" in report.upsamples[2].reason


class ResizeThenAdd(nn.Module):
    """A DPT head's end: resize to the image, add a pixel embedding (elementwise: Inductor fuses
    the resize into it), and a resize whose output also feeds a convolution."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        fused = F.interpolate(x, size=(9, 9), mode="bilinear", align_corners=True) + embed
        mixed = F.interpolate(x, size=(9, 9), mode="bilinear", align_corners=True)
        return fused.relu() + self.conv(mixed) * mixed


def test_a_resize_that_only_feeds_elementwise_ops_is_left_to_inductors_fusion():
    model = ResizeThenAdd().eval()
    compiled = torch.compile(model, backend=lite3r_backend, options={"compiler": "eager"})
    x, embed = torch.randn(2, 16, 4, 4), torch.randn(16, 9, 9)
    with torch.no_grad():
        assert (compiled(x, embed) - model(x, embed)).abs().max() < 1e-5
    first, second = compile_reports()[-1].upsamples
    assert not first.routed and "only feeds elementwise ops" in first.reason
    assert second.routed, second.reason


def test_a_graph_that_computes_gradients_keeps_inductors_lowering():
    model = FusionLike()
    compiled = torch.compile(model, backend=lite3r_backend, options={"compiler": "eager", "fp8": False})
    x, like = torch.randn(2, 16, 5, 6), torch.randn(1, 1, 13, 11)
    compiled(x, like).sum().backward()
    upsamples = compile_reports()[-1].upsamples
    assert [u.routed for u in upsamples] == [False, False, False]
    assert "computes gradients" in upsamples[0].reason
    assert model.conv.weight.grad is not None


def test_few_channels_and_option_off_stay_as_they_are():
    model = FusionLike(channels=4).eval()
    compiled = torch.compile(model, backend=lite3r_backend, options={"compiler": "eager"})
    with torch.no_grad():
        compiled(torch.randn(2, 4, 5, 6), torch.randn(1, 1, 13, 11))
    routed = [u.routed for u in compile_reports()[-1].upsamples]
    assert routed == [False, False, False]
    assert "fewer than UpsampleConfig.min_channels=8" in compile_reports()[-1].upsamples[0].reason
    torch._dynamo.reset()
    off = torch.compile(FusionLike().eval(), backend=lite3r_backend,
                        options={"compiler": "eager", "bilinear_kernel": False})
    with torch.no_grad():
        off(torch.randn(2, 16, 5, 6), torch.randn(1, 1, 13, 11))
    assert compile_reports()[-1].upsamples == []


def test_pass_on_a_captured_graph_replaces_only_what_it_reports():
    runs = []

    def route_then_run(gm, example_inputs):
        runs.append((route_bilinear_upsamples(gm, UpsampleConfig(min_channels=32)),
                     route_bilinear_upsamples(gm, UpsampleConfig())))
        runs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    model = FusionLike().eval()
    x, like = torch.randn(2, 16, 5, 6), torch.randn(1, 1, 13, 11)
    with torch.no_grad():
        got = torch.compile(model, backend=route_then_run)(x, like)
        assert (got - model(x, like)).abs().max() < 1e-5
    (too_few, routed), targets = runs
    assert [r.routed for r in too_few] == [False, False, False]
    assert [r.routed for r in routed] == [True, True, False]
    assert routed[0].input_shape == (2, 16, 5, 6) and routed[1].input_shape == (2, 16, 10, 12)
    assert targets.count(interpolate_bilinear) == 2 and targets.count(F.interpolate) == 1


@pytest.mark.slow
def test_inductor_compiles_the_routed_graph_to_the_same_values():
    torch.manual_seed(0)
    model = FusionLike().eval()
    compiled = torch.compile(model, backend=lite3r_backend, options={"fp8": False, "sla": False})
    x, like = torch.randn(2, 16, 5, 6), torch.randn(1, 1, 13, 11)
    with torch.no_grad():
        assert (compiled(x, like) - model(x, like)).abs().max() < 1e-4
    assert [u.routed for u in compile_reports()[-1].upsamples] == [True, True, False]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_a_gpu_the_kernel_matches_f_interpolate_at_dpt_sizes(dtype):
    x = torch.randn(2, 256, 37, 37, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    for kwargs in ({"scale_factor": 2}, {"size": (74, 74)}, {"size": (518, 518)}):
        want = F.interpolate(x, mode="bilinear", align_corners=True, **kwargs)
        got = interpolate_bilinear(x, align_corners=True, **kwargs)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (got.float() - want.float()).abs().max() <= tol * want.abs().max(), kwargs
    model = FusionLike(channels=64).to("cuda", dtype).eval()
    compiled = torch.compile(model, backend=lite3r_backend, options={"fp8": False, "sla": False})
    xs, like = torch.randn(2, 64, 37, 37, device="cuda", dtype=dtype), torch.randn(1, 1, 148, 148, device="cuda")
    with torch.no_grad():
        want, got = model(xs, like), compiled(xs, like)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()) < tol
    assert [u.routed for u in compile_reports()[-1].upsamples] == [True, True, False]
