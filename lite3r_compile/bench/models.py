"""The models of the end-to-end benchmark, in the precision they are deployed in.

A benchmark model is a zoo preset with a bf16 backbone and float32 heads:

- every module but the heads is cast to bfloat16 (weights, buffers, and so the activations);
- each head is cast to float32 and wrapped in :class:`Float32Head`, which casts the head's inputs
  (the backbone's bf16 tokens) to float32. Upstream runs its heads with autocast disabled on a
  float32 residual stream, so they compute in float32; with a bf16 backbone the cast at the head's
  entry is what keeps them there.

:class:`Float32Head` also marks where the heads begin, for the per-op breakdown: a call that
torch.compile does not trace (``torch._dynamo.disable``) opens a profiler range named
``lite3r.bench.heads.<name>`` and, on CUDA, launches a one-cycle ``spin_kernel``, so every kernel
after it on the stream belongs to the heads. Under torch.compile the marker is a graph break
between the backbone and each head (three for VGGT, two for DA3): the heads are compiled graphs of
their own. Forward hooks cannot do this job: a lite student with forward hooks runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lite3r_compile.backends.input_cast import cast_head_inputs

HEADS_RANGE_PREFIX = "lite3r.bench.heads."
# the CUDA kernel torch.cuda._sleep launches: the marker on the GPU timeline
MARKER_KERNEL = "spin_kernel"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: a zoo ``preset`` with constructor ``overrides``, the names of its head
    submodules (run in float32), the image side length, the frame counts run by default, the
    output keys that are inputs passed through (not compared), and the heads that predict
    per-pixel maps (``dense_heads``: the ones ``--bf16-dense-heads`` runs in bfloat16)."""

    preset: str
    heads: tuple[str, ...]
    image_size: int
    frames: tuple[int, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    passthrough_outputs: tuple[str, ...] = ()
    dense_heads: tuple[str, ...] = ()


# VGGT without the track head (it runs only with query points): aggregator, camera, depth and
# point heads. DA3: DualDPT (depth and rays) and the camera decoder; the camera encoder only runs
# with known cameras.
MODELS: dict[str, ModelSpec] = {
    "vggt-1b": ModelSpec("vggt-1b", ("camera_head", "depth_head", "point_head"), 518, (8, 32, 1),
                         {"enable_track": False}, ("images", "pose_enc_list"), ("depth_head", "point_head")),
    "da3-large": ModelSpec("da3-large", ("head", "cam_dec"), 518, (8, 32), dense_heads=("head",)),
    "vggt-tiny": ModelSpec("vggt-tiny", ("camera_head", "depth_head", "point_head"), 28, (1, 2),
                           {"enable_track": False}, ("images", "pose_enc_list"), ("depth_head", "point_head")),
    "da3-tiny": ModelSpec("da3-tiny", ("head", "cam_dec"), 28, (1, 2), dense_heads=("head",)),
}


def model_spec(name: str) -> ModelSpec:
    """The benchmark's spec of the model ``name`` (a key of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"lite3r bench: unknown model {name!r}; benchmarked models: {', '.join(MODELS)}")
    return MODELS[name]


@torch.library.custom_op("lite3r_bench::head_marker", mutates_args=())
def head_marker(after: Tensor, name: str) -> Tensor:
    """Say that the head ``name`` starts here: a profiler range and, on CUDA, a one-cycle kernel
    (the marker on the GPU timeline), once ``after`` exists. Returns a zero scalar of ``after``'s
    dtype, which :class:`Float32Head` adds to the head's inputs under ``torch.compile``, so the
    compiled graph orders the head's kernels after the marker. A custom op (not a
    ``torch._dynamo.disable`` function) so that a compiled model stays one graph: the heads'
    unused aggregator outputs are then dead code, as they would be without the marker."""
    with torch.profiler.record_function(HEADS_RANGE_PREFIX + name):
        if after.device.type == "cuda":
            torch.cuda._sleep(1)
    return after.new_zeros(())


@head_marker.register_fake
def _(after: Tensor, name: str) -> Tensor:
    return after.new_empty(())


def _last_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in reversed(value):
            found = _last_tensor(item)
            if found is not None:
                return found
    return None


def _plus(value: Any, token: Tensor) -> Any:
    if isinstance(value, Tensor):
        return value + token if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_plus(v, token) for v in value)
    if isinstance(value, dict):
        return {k: _plus(v, token) for k, v in value.items()}
    return value


class Float32Head(nn.Module):
    """A head run in float32 behind a bf16 backbone, as upstream runs it: casts its floating-point
    inputs to its parameters' dtype (float32 as built; bfloat16 once a deployment with
    ``LiteConfig.bf16_heads`` lowered it; list items as the head reads them, see
    :mod:`~lite3r_compile.backends.input_cast`), marks the start of the head for the
    profiler (:func:`head_marker`, after the last tensor of the head's first argument: the
    backbone's last layer) and calls ``module``."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        self.head_name = name
        self.module = module.float()

    def compute_dtype(self) -> torch.dtype:
        """The dtype holding most of the head's parameters (an SLA projection inside it stays
        float32 whatever the head runs in)."""
        count: dict[torch.dtype, int] = {}
        for p in self.module.parameters():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
        return max(count, key=count.get) if count else torch.float32

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        after = _last_tensor(args[:1])
        args, kwargs = cast_head_inputs(args, kwargs, self.compute_dtype())
        if after is not None:
            token = head_marker(after, self.head_name)
            if torch.compiler.is_compiling():
                # + 0.0 makes every input depend on the marker (eager runs in program order
                # anyway); Inductor fuses the add into the inputs' first consumers, and inputs
                # the head never reads stay dead
                args, kwargs = _plus(args, token), _plus(kwargs, token)
        return self.module(*args, **kwargs)


def build_model(spec: ModelSpec, device: torch.device | str, *, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The preset of ``spec`` with random weights drawn from ``seed`` (the same weights for every
    call with the same seed and device), its backbone in ``dtype``, its heads in float32 behind
    :class:`Float32Head`, in eval mode, on ``device``."""
    from lite3r_compile import models_zoo

    torch.manual_seed(seed)
    model = models_zoo.create(spec.preset, device=device, **spec.overrides)
    missing = [h for h in spec.heads if not isinstance(getattr(model, h, None), nn.Module)]
    if missing:
        raise ValueError(f"lite3r bench: {spec.preset} has no head module(s) {missing}; check MODELS[{spec.preset!r}]")
    model.to(dtype)
    for name in spec.heads:
        setattr(model, name, Float32Head(name, getattr(model, name)))
    return model.eval()


def make_images(spec: ModelSpec, frames: int, device: torch.device | str, *, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Random images (1, frames, 3, side, side) in [0, 1] in ``dtype`` (the backbone's)."""
    generator = torch.Generator(device="cpu").manual_seed(seed + frames)
    side = spec.image_size
    images = torch.rand(1, frames, 3, side, side, generator=generator)
    return images.to(device=device, dtype=dtype)


def output_tensors(output: Any, skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The tensors of a model output by name: a dict's tensor values, minus the keys in ``skip``,
    or ``{"output": tensor}``."""
    if isinstance(output, Tensor):
        return {"output": output}
    if isinstance(output, dict):
        return {k: v for k, v in output.items() if isinstance(v, Tensor) and k not in skip}
    if isinstance(output, (list, tuple)):
        return {f"[{i}]": v for i, v in enumerate(output) if isinstance(v, Tensor)}
    raise TypeError(f"lite3r bench: cannot compare a model output of type {type(output).__name__}")
