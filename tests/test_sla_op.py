"""The lite3r::sla_forward / sla_backward ops: opcheck, gradcheck, torch.compile, torch.export."""

from __future__ import annotations

import sys

import pytest
import torch

import lite3r_compile.sla
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from lite3r_compile.sla import SLAConfig, SparseLinearAttention, op, reference, sla_attention
from lite3r_compile.sla.config import FEATURE_MAPS


def _inputs(batch, heads, q_len, k_len, head_dim, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype) for n in (q_len, k_len, k_len))
    weight_dtype = reference.compute_dtype(dtype)
    weight = (torch.randn(head_dim, head_dim, generator=gen) / head_dim**0.5).to(weight_dtype)
    bias = torch.randn(head_dim, generator=gen).to(weight_dtype)
    tensors = (q, k, v, weight, bias)
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def _op_args(tensors, config, scale, save):
    return (
        *tensors, scale, config.topk, config.negligible, config.block_q, config.block_k,
        config.feature_map, save,
    )


@pytest.mark.parametrize(
    "shape, dtype, save, feature_map",
    [
        ((1, 2, 37, 53, 32), torch.float32, True, "softmax"),
        ((2, 1, 16, 70, 32), torch.float32, False, "elu"),
        ((1, 1, 20, 33, 16), torch.float64, True, "relu"),
        ((1, 2, 40, 40, 32), torch.bfloat16, True, "softmax"),
    ],
)
def test_opcheck_forward(shape, dtype, save, feature_map):
    config = SLAConfig(topk=0.4, negligible=0.2, block_q=16, block_k=16, feature_map=feature_map)
    tensors = _inputs(*shape, dtype=dtype, requires_grad=save)
    torch.library.opcheck(torch.ops.lite3r.sla_forward.default, _op_args(tensors, config, 0.25, save))


def test_opcheck_backward():
    config = SLAConfig(topk=0.4, negligible=0.2, block_q=16, block_k=16, feature_map="elu")
    q, k, v, weight, bias = _inputs(1, 2, 30, 50, 32)
    o, o_l, lse, classes = torch.ops.lite3r.sla_forward(*_op_args((q, k, v, weight, bias), config, 0.25, True))
    grad_o = torch.randn_like(o)
    torch.library.opcheck(
        torch.ops.lite3r.sla_backward.default,
        (grad_o, q, k, v, o, o_l, lse, classes, weight, 0.25, 16, 16, "elu"),
    )


def test_forward_outputs_follow_the_contract():
    config = SLAConfig(topk=0.4, negligible=0.2, block_q=16, block_k=32)
    tensors = _inputs(2, 3, 37, 70, 32, dtype=torch.bfloat16)
    o, o_l, lse, classes = torch.ops.lite3r.sla_forward(*_op_args(tensors, config, 0.2, True))
    assert o.shape == (2, 3, 37, 32) and o.dtype == torch.bfloat16
    assert o_l.shape == (2, 3, 37, 32) and o_l.dtype == torch.float32
    assert lse.shape == (2, 3, 37) and lse.dtype == torch.float32
    assert classes.shape == (2, 3, 3, 3) and classes.dtype == torch.int8
    expected = reference.sla_forward(*tensors, 0.2, config)
    for got, want in zip((o, o_l, lse, classes), expected):
        assert torch.equal(got, want)

    o_ns, o_l_ns, lse_ns, classes_ns = torch.ops.lite3r.sla_forward(*_op_args(tensors, config, 0.2, False))
    assert torch.equal(o_ns, o) and torch.equal(classes_ns, classes)
    assert o_l_ns.shape == (0,) and lse_ns.shape == (0,)


def test_fake_shapes_with_ragged_lengths():
    config = SLAConfig(topk=0.5, block_q=32, block_k=64)
    with FakeTensorMode():
        tensors = _inputs(2, 4, 100, 129, 64, dtype=torch.float16)
        o, o_l, lse, classes = torch.ops.lite3r.sla_forward(*_op_args(tensors, config, 0.125, True))
    assert o.shape == (2, 4, 100, 64) and o.dtype == torch.float16
    assert o_l.shape == (2, 4, 100, 64) and lse.shape == (2, 4, 100)
    assert classes.shape == (2, 4, 4, 3)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_gradcheck_through_the_op(feature_map):
    config = SLAConfig(topk=0.4, negligible=0.2, block_q=16, block_k=16, feature_map=feature_map)
    tensors = _inputs(1, 1, 20, 70, 8, dtype=torch.float64, seed=2, requires_grad=True)
    classes = reference.classify_blocks(tensors[0], tensors[1], config)
    assert (classes == 1).any() and (classes == 0).any()
    assert torch.autograd.gradcheck(lambda *t: sla_attention(*t, 0.5, config), tensors, fast_mode=True)


def test_gradcheck_full_jacobian():
    config = SLAConfig(topk=0.4, negligible=0.2, block_q=16, block_k=16, feature_map="softmax")
    tensors = _inputs(1, 1, 17, 70, 4, dtype=torch.float64, seed=5, requires_grad=True)
    classes = reference.classify_blocks(tensors[0], tensors[1], config)
    assert (classes == 1).any() and (classes == 0).any()
    assert torch.autograd.gradcheck(lambda *t: sla_attention(*t, 0.5, config), tensors)


def test_gradcheck_cross_attention_empty_marginal_set():
    config = SLAConfig(topk=1.0, block_q=16, block_k=16)
    tensors = _inputs(1, 2, 9, 23, 8, dtype=torch.float64, seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: sla_attention(*t, None, config), tensors, fast_mode=True)


def test_extra_outputs_are_not_differentiable():
    config = SLAConfig(topk=0.5, block_q=16, block_k=16)
    tensors = _inputs(1, 1, 20, 40, 32, requires_grad=True)
    o, o_l, lse, classes = torch.ops.lite3r.sla_forward(*_op_args(tensors, config, 0.2, True))
    assert o.requires_grad
    assert not (o_l.requires_grad or lse.requires_grad or classes.requires_grad)


def test_backward_without_saved_tensors_raises():
    config = SLAConfig(topk=0.5, block_q=16, block_k=16)
    tensors = _inputs(1, 1, 20, 40, 32, requires_grad=True)
    o, _, _, _ = torch.ops.lite3r.sla_forward(*_op_args(tensors, config, 0.2, False))
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        o.sum().backward()


def test_no_grad_keeps_nothing_for_backward():
    config = SLAConfig(topk=0.5, block_q=16, block_k=16)
    tensors = _inputs(1, 1, 20, 40, 32, requires_grad=True)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.lite3r.sla_forward.default:
                seen.append(args[-1])
            return func(*args, **(kwargs or {}))

    with Spy():
        with torch.no_grad():
            sla_attention(*tensors, None, config)
        sla_attention(*tensors, None, config)
    assert seen == [False, True]


def test_invalid_inputs_name_the_op():
    config = SLAConfig(block_q=16, block_k=16)
    q, k, v, weight, bias = _inputs(1, 2, 20, 40, 32)
    with pytest.raises(ValueError, match=r"lite3r::sla_forward.*length"):
        sla_attention(q, k, v[:, :, :30], weight, bias, None, config)
    with pytest.raises(ValueError, match=r"lite3r::sla_forward.*dtype"):
        sla_attention(q, k.double(), v, weight, bias, None, config)


def test_missing_triton_kernels_raise_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lite3r_compile.sla.triton_sla", None)
    # an earlier import leaves the submodule as a package attribute, which `from ... import`
    # would return without looking at sys.modules
    monkeypatch.delattr(lite3r_compile.sla, "triton_sla", raising=False)
    with pytest.raises(RuntimeError, match="lite3r_compile.sla.triton_sla"):
        op._triton_sla()


def _train_step(module, q, k, v):
    out = module(q, k, v)
    params = [q, k, v, module.proj_l.weight, module.proj_l.bias]
    return out, torch.autograd.grad(out.square().sum(), params)


def _trainable_module(head_dim, config):
    module = SparseLinearAttention(head_dim, config)
    with torch.no_grad():
        module.proj_l.weight.normal_()
        module.proj_l.bias.normal_()
    return module


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    config = SLAConfig(topk=0.4, negligible=0.2, block_q=16, block_k=16, feature_map="elu")
    module = _trainable_module(32, config)
    q, k, v = _inputs(1, 2, 37, 70, 32, requires_grad=True)[:3]
    out, grads = _train_step(module, q, k, v)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    out_c, grads_c = _train_step(compiled, q, k, v)
    torch.testing.assert_close(out_c, out)
    for got, want in zip(grads_c, grads):
        torch.testing.assert_close(got, want)


def test_compile_dynamic_shapes_aot_eager():
    torch._dynamo.reset()
    config = SLAConfig(topk=0.5, block_q=16, block_k=16)
    module = _trainable_module(32, config)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=True)
    for q_len, k_len in [(37, 70), (50, 45), (21, 100)]:
        q, k, v = _inputs(1, 2, q_len, k_len, 32, seed=q_len)[:3]
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))


class _AttentionBlock(torch.nn.Module):
    """A small self-attention block whose attention is SLA, as after the rewrite."""

    def __init__(self, dim, heads, config):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.attn = SparseLinearAttention(dim // heads, config)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(self.attn(q, k, v).transpose(1, 2).reshape(batch, length, dim))


def test_export_keeps_the_op():
    config = SLAConfig(topk=0.5, negligible=0.1, block_q=16, block_k=16, feature_map="relu")
    block = _AttentionBlock(64, 2, config).eval()
    with torch.no_grad():
        block.attn.proj_l.weight.normal_()
    x = torch.randn(2, 45, 64)
    length = torch.export.Dim("length", min=config.block_q + 1, max=4096)
    with torch.no_grad():
        exported = torch.export.export(block, (x,), dynamic_shapes=({1: length},))
    targets = [node.target for node in exported.graph.nodes]
    assert torch.ops.lite3r.sla_forward.default in targets
    for n in (45, 70, 17):
        x = torch.randn(2, n, 64)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), block(x))


@given(
    q_len=st.integers(1, 50),
    k_len=st.integers(1, 50),
    head_dim=st.sampled_from([32, 64, 128]),
    topk=st.sampled_from([0.2, 0.5, 1.0]),
    negligible=st.sampled_from([0.0, 0.3]),
    feature_map=st.sampled_from(FEATURE_MAPS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_op_forward_and_backward_match_reference(q_len, k_len, head_dim, topk, negligible, feature_map, dtype):
    if topk + negligible > 1.0:
        negligible = 0.0
    config = SLAConfig(topk=topk, negligible=negligible, block_q=16, block_k=16, feature_map=feature_map)
    tensors = _inputs(1, 2, q_len, k_len, head_dim, dtype=dtype, requires_grad=True)
    out = sla_attention(*tensors, None, config)
    grads = torch.autograd.grad(out.float().square().sum(), tensors)
    expected, _, _, _ = reference.sla_forward(*tensors, None, config)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), tensors)
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype and torch.isfinite(got).all()
        # The op's backward is written out (FlashAttention style, one rounding at the end);
        # autograd of the reference sums in another order and, for bf16/fp16, rounds each path's
        # gradient to the input dtype before adding them.
        rtol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_cuda_op_matches_reference(dtype, feature_map):
    config = SLAConfig(topk=0.3, negligible=0.2, block_q=64, block_k=64, feature_map=feature_map)
    tensors = [t.cuda() for t in _inputs(2, 3, 300, 450, 64, dtype=dtype)]
    for t in tensors:
        t.requires_grad_()
    out = sla_attention(*tensors, None, config)
    grads = torch.autograd.grad(out.float().square().sum(), tensors)
    cpu = [t.detach().cpu().float().requires_grad_() for t in tensors]
    classes = torch.ops.lite3r.sla_forward(*_op_args(tensors, config, 64**-0.5, False))[3].cpu()
    expected, _, _ = reference.sla_with_block_class(*cpu, classes, None, config)
    expected_grads = torch.autograd.grad(expected.to(dtype).float().square().sum(), cpu)
    tolerance = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float().cpu(), expected.to(dtype).float(), rtol=tolerance, atol=tolerance)
    for got, want in zip(grads, expected_grads):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float().cpu() / scale, want / scale, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("n_keys, topk, block_k, expected", [
    (8, 0.1, 64, True),      # one key block, which is critical
    (64, 0.1, 64, True),
    (65, 0.1, 64, False),    # two blocks, one critical
    (65, 0.5, 64, False),    # ceil(0.5 * 2) = 1 of 2
    (65, 0.6, 64, True),     # ceil(0.6 * 2) = 2 of 2
    (1000, 1.0, 64, True),
    (1000, 0.99, 64, True),  # ceil(0.99 * 16) = 16 of 16
    (1000, 0.9, 64, False),  # 15 of 16
    (0, 1.0, 64, False),
])
def test_every_block_critical(n_keys, topk, block_k, expected):
    assert op.every_block_critical(n_keys, SLAConfig(topk=topk, block_k=block_k)) is expected


@pytest.mark.parametrize("dtype, q_len, k_len", [(torch.float32, 9, 9), (torch.float32, 30, 50),
                                                 (torch.float64, 7, 12), (torch.bfloat16, 20, 33)])
def test_dense_path_equals_the_op_where_every_block_is_critical(dtype, q_len, k_len):
    # The CUDA shortcut (SDPA + bias), run here on the CPU, against the op (the reference) at
    # topk=1.0 with a random non-zero projection: same output, same gradients, and a zero (not
    # missing) gradient for the projection weight.
    config = SLAConfig(topk=1.0, block_q=16, block_k=16)
    tensors = _inputs(2, 3, q_len, k_len, 32, dtype=dtype, requires_grad=True, seed=q_len)
    scale = 0.3
    got = op.dense_attention(*tensors, scale)
    want, _, _, _ = reference.sla_forward(*tensors, scale, config)
    assert got.dtype == dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, tensors, grad)
    want_grads = torch.autograd.grad(want, tensors, grad)
    assert torch.count_nonzero(got_grads[3]) == 0
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * float(w.abs().max() + 1))


def test_cpu_calls_keep_the_reference_where_every_block_is_critical(monkeypatch):
    # Off CUDA the op (the specification) runs even at topk=1.0: the shortcut is never taken.
    monkeypatch.setattr(op, "dense_attention", lambda *a: pytest.fail("dense shortcut taken on CPU"))
    tensors = _inputs(1, 2, 10, 10, 32)
    sla_attention(*tensors, None, SLAConfig(topk=1.0))
