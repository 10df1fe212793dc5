"""The deployment FP8 Linear: one byte a weight, the QAT layer's arithmetic, saturation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from lite3r_compile.backends.fp8_linear import Float8Linear, has_fp8_gemm, quantize_to_e4m3
from lite3r_compile.passes.fp8_qat import FP8FakeQuantLinear


@given(
    granularity=st.sampled_from(["rowwise", "tensorwise"]),
    shape=st.sampled_from([(16, 16), (32, 48), (64, 16)]),
    lead=st.sampled_from([(1,), (3,), (2, 5)]),
    seed=st.integers(0, 2**16),
)
def test_matches_the_fake_quant_layer_it_deploys(granularity, shape, lead, seed):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(*shape)
    fq = FP8FakeQuantLinear.from_linear(linear, granularity=granularity)
    deployed = Float8Linear.from_fake_quant(fq, dtype=torch.float32)
    x = torch.randn(*lead, shape[0]) * 3
    torch.testing.assert_close(deployed(x), fq(x), rtol=0, atol=1e-6)


def test_weights_take_one_byte_and_the_module_has_no_parameters():
    deployed = Float8Linear.from_linear(torch.nn.Linear(64, 32))
    assert deployed.weight.dtype == torch.float8_e4m3fn and deployed.weight.element_size() == 1
    assert list(deployed.parameters()) == []
    assert set(deployed.state_dict()) == {"weight", "weight_scale", "bias"}


def test_activations_far_beyond_the_fp8_range_saturate_instead_of_nan():
    deployed = Float8Linear.from_linear(torch.nn.Linear(16, 16), granularity="tensorwise")
    x = torch.randn(4, 16)
    x[0, 0] = 1e30
    assert torch.isfinite(deployed(x)).all()
    q, scale = quantize_to_e4m3(torch.tensor([[1e30, 1.0, -1e30]]), rowwise=False)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == 448


def test_zero_rows_stay_zero():
    deployed = Float8Linear.from_linear(torch.nn.Linear(16, 16, bias=False))
    assert torch.equal(deployed(torch.zeros(2, 16)), torch.zeros(2, 16))


def test_bad_shapes_are_refused_with_the_remedy():
    with pytest.raises(ValueError, match="divisible by 16.*high precision"):
        Float8Linear(20, 16)
    with pytest.raises(ValueError, match="input has 8 features, expected 16"):
        Float8Linear(16, 16)(torch.randn(2, 8))


def test_no_fp8_gemm_on_cpu():
    assert not has_fp8_gemm("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
def test_scaled_mm_matches_emulation_on_gpu(granularity):
    if not has_fp8_gemm("cuda"):
        pytest.skip("needs a GPU of compute capability >= 8.9")
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 4096, device="cuda", dtype=torch.bfloat16)
    deployed = Float8Linear.from_linear(linear, granularity=granularity)
    x = torch.randn(8, 1374, 1024, device="cuda", dtype=torch.bfloat16)
    emulated = Float8Linear.from_linear(linear.float().cpu(), granularity=granularity, dtype=torch.float32)
    ref = emulated(x.float().cpu())
    out = deployed(x).float().cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
