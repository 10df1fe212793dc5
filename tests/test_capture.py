"""Capture: recording module calls, shallow value-tracing, guards, and leaving the model as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lite3r_compile.capture import (
    CaptureError,
    TensorSpec,
    capture_model,
    capture_module,
    record_module_calls,
)


class DataDependentRope(nn.Module):
    """RoPE whose table is sized by ``int(pos.max())`` (VGGT's), with a cache keyed on shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict = {}

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        size = int(pos.max()) + 1
        key = (size, x.shape[-1])
        if key not in self.cache:
            self.cache[key] = torch.arange(size, dtype=x.dtype, device=x.device)[:, None] * 0.1
        angles = self.cache[key][pos]  # (B, N, 1)
        return x * angles.cos()[:, None]


class ShapeBranchAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = DataDependentRope()

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        if N > 1:  # a branch on a shape: taken at capture, guarded in the graph
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.size(-1)))
        else:
            out = v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ShapeBranchAttention()
        self.b = ShapeBranchAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.b(self.a(x, pos))


def test_record_module_calls_keeps_signatures_not_tensors():
    model = Net()
    records = record_module_calls(model, (torch.randn(2, 5, 16),))
    cpu = torch.device("cpu")
    call = records["a"].calls[0]
    assert call.args == (TensorSpec((2, 5, 16), torch.float32, cpu), TensorSpec((2, 5), torch.int64, cpu))
    assert call.kwargs == {} and call.output == TensorSpec((2, 5, 16), torch.float32, cpu)
    assert len(records["b"].calls[0].args) == 1  # pos left to its default
    assert len(records["a.rope"].calls) == 1 and records["a.rope"].calls[0].count == 2  # q, k: one signature
    assert "" in records


def test_failure_on_example_inputs_names_the_module():
    with pytest.raises(CaptureError, match=r"module 'a\.qkv' \(Linear\)"):
        record_module_calls(Net(), (torch.randn(2, 5, 7),))


def test_missing_example_inputs_is_a_clear_error():
    with pytest.raises(ValueError, match="needs example inputs"):
        record_module_calls(Net(), None)


def test_data_dependent_child_does_not_stop_the_parent():
    model = Net()
    x = torch.randn(2, 5, 16)
    capture = capture_model(model, (x,))
    graph = capture.modules["a"].graph_module.graph
    targets = {n.target for n in graph.nodes if n.op == "call_module"}
    assert {"qkv", "rope", "proj"} <= targets  # children are single nodes
    assert any(n.target is F.scaled_dot_product_attention for n in graph.nodes)
    # the rope itself needed real values: captured on the second (real) pass, not a failure
    assert capture.modules["a.rope"].method == "symbolic_trace (real values)"
    pos = torch.arange(5).expand(2, -1)
    gm = capture.modules["a"].graph_module
    torch.testing.assert_close(gm(x, pos), model.a(x, pos))


def test_captured_module_is_shape_generic_and_guarded():
    model = Net()
    capture = capture_model(model, (torch.randn(2, 5, 16),))
    gm = capture.modules["b"].graph_module
    x = torch.randn(3, 7, 16)  # other batch and token count: same graph
    torch.testing.assert_close(gm(x), model.b(x))
    # the N > 1 branch was specialised: another path fails loudly instead of computing wrong
    with pytest.raises(AssertionError, match="specialised"):
        gm(torch.randn(1, 1, 16))
    # a concrete argument (pos=None at capture) is guarded too
    with pytest.raises(AssertionError, match="pos"):
        gm(x, torch.zeros(3, 7, dtype=torch.long))


def test_capture_keeps_parameter_names_and_unused_state():
    model = Net()
    model.a.register_buffer("unused", torch.ones(3))
    capture = capture_model(model, (torch.randn(2, 5, 16),))
    gm = capture.modules["a"].graph_module
    assert set(gm.state_dict()) == set(model.a.state_dict())
    assert gm.qkv is model.a.qkv  # the same children, not copies


def test_capture_leaves_no_proxy_or_fake_tensor_in_the_model():
    model = Net()
    x = torch.randn(2, 5, 16)
    expected = model(x)
    cache_before = dict(model.a.rope.cache)
    capture_model(model, (x,))
    assert model.a.rope.cache.keys() == cache_before.keys()
    for module in model.modules():
        for value in module.__dict__.values():
            assert not isinstance(value, fx.Proxy)
    copy.deepcopy(model)  # a proxy left in a cache would make this fail
    torch.testing.assert_close(model(x), expected)


def test_meta_model_with_item_call_records_shapes():
    with torch.device("meta"):
        model = Net()
        x = torch.empty(2, 5, 16)
    capture = capture_model(model, (x,))
    assert "a.rope" in capture.meta_guesses
    gm = capture.modules["a"].graph_module
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert tuple(sdpa.meta["val"].shape) == (2, 2, 5, 8)


def test_untraceable_forward_is_reported_with_reason():
    class VarArgs(nn.Module):
        def forward(self, *xs):
            return sum(xs)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = VarArgs()

        def forward(self, x):
            return self.inner(x, x)

    capture = capture_model(Outer(), (torch.randn(2),))
    assert [f.path for f in capture.failures] == ["inner"]
    assert "*args" in capture.failures[0].reason
    assert "" in capture.modules  # the parent still captured, with the child as one node


def test_capture_module_requires_a_recorded_call():
    model = Net()
    records = record_module_calls(model, (torch.randn(2, 5, 16),))
    with pytest.raises(CaptureError, match="did not run"):
        capture_module("nope", model, records)
