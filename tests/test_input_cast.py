"""A head's list inputs are cast item by item as the head reads them, never all on entry."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lite3r_compile import models_zoo
from lite3r_compile.api import lite
from lite3r_compile.backends.deploy import deploy
from lite3r_compile.backends.input_cast import CastOnRead, cast_floats, cast_head_inputs
from lite3r_compile.bench.models import Float32Head, build_model, make_images, model_spec, output_tensors
from lite3r_compile.config import LiteConfig


class CountCasts(TorchDispatchMode):
    """Counts the dtype conversions (``aten._to_copy`` to another dtype) run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype", args[0].dtype) != args[0].dtype:
            self.count += 1
        return func(*args, **kwargs)


class LastLayerHead(nn.Module):
    """Reads the last of the layers it is given, as VGGT's camera head does."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 3)

    def forward(self, layers, scale: torch.Tensor):
        return self.proj(layers[-1]) * scale


def _layers(n=6, width=8, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return [torch.randn(2, 5, width).to(dtype) for _ in range(n)]


def test_cast_on_read_casts_an_item_once_when_read_and_behaves_as_a_sequence():
    layers = _layers(dtype=torch.bfloat16)
    view = CastOnRead(layers, torch.float32)
    assert len(view) == 6 and view.read_indices() == []
    last = view[-1]
    assert last.dtype == torch.float32 and torch.equal(last, layers[5].float())
    assert view[5] is last, "a second read returns the copy made by the first"
    assert view.read_indices() == [5]
    assert [t.dtype for t in view[1:3]] == [torch.float32] * 2 and view.read_indices() == [1, 2, 5]
    assert all(torch.equal(a, b.float()) for a, b in zip(view, layers))
    with pytest.raises(IndexError, match="out of range"):
        view[6]
    with pytest.raises(IndexError, match="out of range"):
        view[-7]


def test_cast_head_inputs_wraps_only_lists_that_need_a_cast():
    layers = _layers(dtype=torch.bfloat16)
    scale = torch.ones(()).to(torch.bfloat16)
    (wrapped, cast_scale), kw = cast_head_inputs((layers, scale), {"extra": [layers[0]], "n": 3}, torch.float32)
    assert isinstance(wrapped, CastOnRead) and isinstance(kw["extra"], CastOnRead) and kw["n"] == 3
    assert cast_scale.dtype == torch.float32
    (same,), _ = cast_head_inputs((layers,), {}, torch.bfloat16)
    assert same is layers, "a list already in the head's dtype is passed as it is"
    # nested structures inside one item are cast together when that item is read
    pairs = [(t, t * 2) for t in layers]
    (view,), _ = cast_head_inputs((pairs,), {}, torch.float32)
    assert [t.dtype for t in view[0]] == [torch.float32] * 2


def test_the_benchmarks_float32_head_casts_only_the_layer_it_reads():
    layers, scale = _layers(dtype=torch.bfloat16), torch.full((), 2.0, dtype=torch.bfloat16)
    head = Float32Head("camera_head", LastLayerHead())
    with torch.no_grad(), CountCasts() as casts:
        out = head(layers, scale)
    # the last layer and the scale: casting all six layers on entry would be seven
    assert casts.count == 2
    with torch.no_grad():
        expected = head.module(cast_floats(layers, torch.float32), scale.float())
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_a_compiled_head_casts_on_entry_and_gives_the_eager_result():
    layers, scale = _layers(dtype=torch.bfloat16), torch.full((), 2.0, dtype=torch.bfloat16)
    head = Float32Head("camera_head", LastLayerHead())
    torch._dynamo.reset()
    compiled = torch.compile(head, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(layers, scale), head(layers, scale))


def test_the_deployed_students_bfloat16_heads_cast_only_what_they_read():
    # a float32 VGGT: every head of the deployed student runs in bf16 and gets the aggregator's
    # 2 float32 layers; each head reads the ones it needs and no other is cast
    torch.manual_seed(0)
    model = models_zoo.create("vggt-tiny", enable_track=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(model, backend="fp8", config=LiteConfig(bf16_heads=("camera_head",)))
        deployed = deploy(student, "fp8", compile=False)
    images, _ = model.example_inputs()
    camera = deployed.module.camera_head
    seen = []
    camera.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        out = output_tensors(deployed(images))
    (layers,) = seen
    assert isinstance(layers, CastOnRead) and layers.read_indices() == [len(layers) - 1]
    assert out["pose_enc"].dtype == torch.float32 and torch.isfinite(out["pose_enc"]).all()


def test_vggt_bench_model_outputs_are_those_of_casting_every_layer_on_entry():
    spec = model_spec("vggt-tiny")
    model = build_model(spec, "cpu")
    images = make_images(spec, 2, "cpu")
    with torch.no_grad():
        lazy = output_tensors(model(images), spec.passthrough_outputs)
    eager_cast = {name: getattr(model, name) for name in spec.heads}
    for name, wrapper in eager_cast.items():
        module = wrapper.module
        wrapper.forward = lambda *a, _m=module, **k: _m(*cast_floats(a, torch.float32), **cast_floats(k, torch.float32))
    with torch.no_grad():
        expected = output_tensors(model(images), spec.passthrough_outputs)
    assert lazy.keys() == expected.keys()
    for key in lazy:
        assert torch.equal(lazy[key], expected[key]), key
