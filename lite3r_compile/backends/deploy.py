"""Deployment lowering of a lite student: the eval-mode form that ``backend="fp8"`` and
``backend="inductor"`` run.

``deploy(student, backend)`` builds a copy of the student for inference and compiles it:

- the copy's modules are new objects; its Parameters are new ``nn.Parameter`` objects without
  gradients sharing storage (and version counters) with the student's, its buffers are the
  student's own tensors, so nothing but the FP8 weights takes new memory;
- ``backend="fp8"``: every :class:`~lite3r_compile.passes.fp8_qat.FP8FakeQuantLinear` that
  quantizes its input becomes a :class:`~lite3r_compile.backends.fp8_linear.Float8Linear` (float8
  e4m3 weight, one byte a parameter, with its rowwise or tensorwise scale). The input
  quantization is plain tensor ops, so Inductor fuses it into the kernel producing the input
  (LayerNorm, residual add). An MLP's GELU is folded into its second layer, whose quantization
  kernel computes it (:mod:`lite3r_compile.backends.fuse_gelu`: Inductor's fused GELU + rowwise
  reduction over 4096-wide rows runs at a third of the bandwidth), and a block's LayerNorm into
  the layer it feeds (``qkv``, ``fc1``; :mod:`lite3r_compile.backends.fuse_layernorm`: Inductor's
  norm + amax reads the row three times). Weight-only fake-quant layers
  stay fake-quant (an FP8 GEMM needs FP8 inputs); the record lists them with the reason;
- ``backend="inductor"``: the same without FP8 lowering: fake-quant layers keep the arithmetic the
  student was trained with (e4m3 rounding, high-precision GEMMs), fused by Inductor;
- ``LiteConfig.bf16_heads`` (both backends): the float32 heads it names run in bfloat16
  (:mod:`lite3r_compile.backends.head_precision`);
- SLA runs as the ``lite3r::sla_forward`` custom op, an opaque node Inductor schedules around
  (Triton kernels on CUDA, the reference elsewhere); everything else goes through Inductor, with
  CUDA graphs on request (``LiteConfig.cuda_graphs``). Graph breaks are reported
  (``GraphBreakWarning``), never hidden;
- ``LiteConfig.regional_compile``: only the repeated blocks and the heads are compiled, each
  block class and shape once (:mod:`lite3r_compile.backends.regions`); the rest runs eagerly.
  With CUDA graphs, each region's graph is replayed as a CUDA graph, the code between them runs
  eagerly, and the outputs are copied out of the graphs' memory.

Where the machine has no FP8 GEMMs (no GPU of compute capability >= 8.9), ``Float8Linear``
emulates them with the same rounded operands in float32, said once by an ``FP8EmulationWarning``.

:func:`install_eval_backend` wires this into a student: its eval-mode calls go to a deployed form
built on first use and kept in step with the student's weights (see :class:`EvalBackend`).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from lite3r_compile.backends.fp8_linear import Float8Linear, has_fp8_gemm
from lite3r_compile.backends.fuse_gelu import fuse_gelu_quantization
from lite3r_compile.backends.fuse_layernorm import fuse_layernorm_quantization
from lite3r_compile.backends.head_precision import lower_head_precision
from lite3r_compile.backends.module_watch import ModuleState, ModuleWatch
from lite3r_compile.passes.fp8_qat import FP8FakeQuantLinear

DEPLOY_BACKENDS: tuple[str, ...] = ("fp8", "inductor")


class EagerForHooksWarning(UserWarning):
    """An eval-mode student with forward hooks on its modules runs eagerly, so the hooks fire."""


@dataclass
class DeployRecord:
    """What :func:`deploy` did. ``float8_layers``: paths lowered to ``Float8Linear``;
    ``fake_quant_layers``: (path, why) of fake-quant layers left as they are; ``fp8_emulated``:
    FP8 GEMMs are emulated (no GPU of compute capability >= 8.9); ``compiled``: the module runs
    through ``torch.compile`` (Inductor); ``cuda_graphs``: Inductor's CUDA graphs are on;
    ``bf16_heads``: heads lowered to bfloat16, ``heads_kept``: (path, why) of heads left as they
    are (both empty unless ``LiteConfig.bf16_heads`` names some); ``compiled_blocks``: with
    regional compilation, the lists of repeated blocks compiled (``"path: count x Class"``);
    ``multi_kernel``: Inductor's multi-kernel reductions are on (``LiteConfig.inductor_multi_kernel``);
    ``gelu_fused``: GELU modules folded into the FP8 quantization of the layer after them, and
    ``gelu_kept``: (path, why) of those left as they are
    (:func:`~lite3r_compile.backends.fuse_gelu.fuse_gelu_quantization`); ``layernorm_fused``:
    (norm, layer) of the LayerNorms moved into the FP8 layer they feed, ``layernorm_kept``: (path,
    why) of those left as they are
    (:func:`~lite3r_compile.backends.fuse_layernorm.fuse_layernorm_quantization`); ``head_frames_chunk``:
    heads whose frame chunk ``LiteConfig.head_frames_chunk`` set."""

    backend: str
    float8_layers: list[str] = field(default_factory=list)
    fake_quant_layers: list[tuple[str, str]] = field(default_factory=list)
    fp8_emulated: bool = False
    compiled: bool = True
    cuda_graphs: bool = False
    bf16_heads: list[str] = field(default_factory=list)
    heads_kept: list[tuple[str, str]] = field(default_factory=list)
    compiled_blocks: list[str] = field(default_factory=list)
    multi_kernel: bool = False
    gelu_fused: list[str] = field(default_factory=list)
    gelu_kept: list[tuple[str, str]] = field(default_factory=list)
    layernorm_fused: list[tuple[str, str]] = field(default_factory=list)
    layernorm_kept: list[tuple[str, str]] = field(default_factory=list)
    head_frames_chunk: list[str] = field(default_factory=list)


class DeployedStudent(nn.Module):
    """The deployed (inference) form of a student: ``module`` is the lowered copy, calls go
    through its compiled form. Shares storage with the student; :meth:`refresh` re-quantizes the
    FP8 weights and re-casts the bfloat16 heads in place after the student's weights changed (no
    recompilation)."""

    def __init__(self, module: nn.Module, record: DeployRecord, sources: list[tuple[Float8Linear, nn.Linear]],
                 runner: Any, casts: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.module = module
        self.record = record
        # Plain attributes (not submodules): the student's layers and the compiled wrapper must
        # not show up in this module's state dict or parameters.
        self.__dict__["_sources"] = sources
        self.__dict__["_casts"] = casts or []
        self.__dict__["_runner"] = runner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.record.cuda_graphs:
            return self._runner(*args, **kwargs)
        # One call is one step: the CUDA graph trees reuse the previous step's memory, so the
        # outputs a graph wrote (a compiled head's maps) are copied out, to stay valid after the
        # next call as a model's outputs do.
        torch.compiler.cudagraph_mark_step_begin()
        return copy_tensors(self._runner(*args, **kwargs))

    def refresh(self) -> None:
        """Re-quantize every ``Float8Linear`` from the student layer it was lowered from, and
        re-cast every bfloat16 head tensor from the student's."""
        for layer, source in self._sources:
            layer.quantize_from(source)
        with torch.no_grad():
            for low, source in self._casts:
                low.copy_(source)


def copy_tensors(value: Any) -> Any:
    """``value`` with every tensor in it (also inside lists, tuples and dicts) cloned."""
    return tree_map_only(torch.Tensor, torch.Tensor.clone, value)


def model_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (CPU for a module with neither)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def inference_copy(student: nn.Module) -> nn.Module:
    """A copy of ``student`` whose modules are new objects, whose Parameters are new
    ``nn.Parameter`` objects with ``requires_grad=False`` sharing storage with the student's, and
    whose buffers are the student's own tensors. An :class:`EvalBackend` installed on the student
    and its ``lite3r_record`` are not copied (the copy runs its class's forward)."""
    memo: dict[int, Any] = {}
    for p in student.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in student.buffers():
        memo[id(b)] = b
    dropped = object()
    router = student.__dict__.get("forward")
    if isinstance(router, EvalBackend):
        memo[id(router)] = dropped
    record = student.__dict__.get("lite3r_record")
    if record is not None:
        memo[id(record)] = record
    try:
        result = copy.deepcopy(student, memo)
    except Exception as err:
        raise TypeError(
            f"deploy: cannot copy the structure of {type(student).__name__} (copy.deepcopy failed: "
            f"{err}); every module attribute must support deepcopy"
        ) from err
    if result.__dict__.get("forward") is dropped:
        del result.__dict__["forward"]
    return result.eval()


def lower_fp8(module: nn.Module, student: nn.Module, record: DeployRecord) -> list[tuple[Float8Linear, nn.Linear]]:
    """Replace, in ``module`` (an :func:`inference_copy` of ``student``), every fake-quant Linear
    that quantizes its input by a ``Float8Linear``. Returns (new layer, the student's layer) pairs."""
    replacement: dict[int, Float8Linear] = {}
    sources = []
    student_modules = dict(student.named_modules(remove_duplicate=False))
    for path, m in module.named_modules(remove_duplicate=False):
        if not isinstance(m, FP8FakeQuantLinear) or id(m) in replacement:
            continue
        if not m.quantize_activations:
            record.fake_quant_layers.append((path, "weight-only fake-quant: an FP8 GEMM needs FP8 inputs"))
            continue
        layer = Float8Linear.from_fake_quant(m, dtype=m.weight.dtype)
        replacement[id(m)] = layer
        sources.append((layer, student_modules[path]))
        record.float8_layers.append(path)
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[name] = replacement[id(child)]
    return sources


def set_head_frames_chunk(module: nn.Module, frames: int) -> list[str]:
    """Make every head of ``module`` that runs its frames in chunks (a ``frames_chunk_size``
    attribute, on the head or a module inside it) run ``frames`` at a time; returns their paths.
    Raises ``ValueError`` where no head has the attribute, rather than ignore the setting."""
    from lite3r_compile.backends.head_precision import find_heads

    paths = [f"{head}.{sub}" if sub else head for head in find_heads(module)
             for sub, m in module.get_submodule(head).named_modules() if hasattr(m, "frames_chunk_size")]
    if not paths:
        raise ValueError(
            f"LiteConfig.head_frames_chunk={frames}: no head of {type(module).__name__} runs its frames in "
            "chunks (a frames_chunk_size attribute, as VGGT's DPT heads have); leave it None for this model"
        )
    for path in paths:
        module.get_submodule(path).frames_chunk_size = frames
    return paths


def deploy(
    student: nn.Module,
    backend: str = "fp8",
    *,
    compile: bool = True,
    cuda_graphs: bool | None = None,
    dynamic: bool | None = None,
    regional: bool | None = None,
    warn_emulation: bool = True,
) -> DeployedStudent:
    """The deployed, compiled eval-mode form of ``student`` (see the module docstring).

    ``compile=False`` returns the lowered module run eagerly (for inspection and tests).
    ``cuda_graphs``: Inductor records CUDA graphs (``triton.cudagraphs``; default: the student's
    ``LiteConfig.cuda_graphs``, False for a module that is not a lite student; inputs of a new shape
    record a new graph). ``dynamic`` is ``torch.compile``'s: ``None`` marks sizes dynamic when
    they change (a new number of frames compiles once more, then never again), ``True`` from the
    first call. ``regional``: compile the repeated blocks only (default: the student's
    ``LiteConfig.regional_compile``, False for a module that is not a lite student).
    ``warn_emulation``: say once when FP8 is emulated (``lite()`` has already said so for its
    students).
    """
    if backend not in DEPLOY_BACKENDS:
        raise ValueError(f"deploy: backend must be one of {DEPLOY_BACKENDS}, got {backend!r}")
    lite_record = getattr(student, "lite3r_record", None)
    if regional is None:
        regional = lite_record is not None and lite_record.config.regional_compile
    if cuda_graphs is None:
        cuda_graphs = lite_record is not None and lite_record.config.cuda_graphs
    device = model_device(student)
    record = DeployRecord(backend, compiled=compile)
    module = inference_copy(student)
    sources: list[tuple[Float8Linear, nn.Linear]] = []
    if backend == "fp8":
        sources = lower_fp8(module, student, record)
        fusion = fuse_gelu_quantization(module)
        record.gelu_fused, record.gelu_kept = fusion.fused, fusion.kept
        record.fp8_emulated = bool(record.float8_layers) and not has_fp8_gemm(device)
        if record.fp8_emulated and warn_emulation:
            from lite3r_compile.api import FP8EmulationWarning

            warnings.warn(
                f"deploy(backend='fp8'): {device} has no FP8 GEMMs (a CUDA GPU of compute "
                f"capability >= 8.9 has); the {len(record.float8_layers)} float8 layers emulate "
                "them with the same rounded operands in float32",
                FP8EmulationWarning,
                stacklevel=2,
            )
    else:
        for path, m in module.named_modules():
            if isinstance(m, FP8FakeQuantLinear):
                record.fake_quant_layers.append((path, "backend 'inductor' keeps the trained fake-quant arithmetic"))
    if cuda_graphs and device.type != "cuda":
        warnings.warn(f"deploy: cuda_graphs=True ignored: the student is on {device}, not a CUDA GPU",
                      UserWarning, stacklevel=2)
        cuda_graphs = False
    casts: list[tuple[torch.Tensor, torch.Tensor]] = []
    if lite_record is not None and lite_record.config.bf16_heads:
        record.bf16_heads, record.heads_kept, casts = lower_head_precision(
            module, student, lite_record.config.bf16_heads, torch.bfloat16)
    if backend == "fp8":
        # after the heads' casts: a norm moved into a Float8Linear would keep its precision there
        norms = fuse_layernorm_quantization(module)
        record.layernorm_fused, record.layernorm_kept = norms.fused, norms.kept
    if lite_record is not None and lite_record.config.head_frames_chunk is not None:
        record.head_frames_chunk = set_head_frames_chunk(module, lite_record.config.head_frames_chunk)
    record.cuda_graphs = cuda_graphs and compile
    record.multi_kernel = compile and lite_record is not None and lite_record.config.inductor_multi_kernel
    runner = module
    if compile:
        runner, record.compiled_blocks = compile_for_inference(
            module, cuda_graphs=cuda_graphs, dynamic=dynamic, regional=regional, multi_kernel=record.multi_kernel,
            bilinear_kernel=lite_record is None or lite_record.config.bilinear_kernel)
    return DeployedStudent(module, record, sources, runner, casts)


def compile_for_inference(module: nn.Module, *, cuda_graphs: bool = False, dynamic: bool | None = None,
                          regional: bool = False, multi_kernel: bool = False,
                          bilinear_kernel: bool = True) -> tuple[Any, list[str]]:
    """``torch.compile`` through Inductor with the ``lite3r`` backend's bookkeeping and nothing
    rewritten (the module is lowered already): graph breaks are reported by a
    ``GraphBreakWarning`` and each graph leaves a ``GraphReport``. With ``regional``, the repeated
    blocks and the heads are compiled in place instead
    (:func:`~lite3r_compile.backends.regions.compile_blocks`), each region's graph a CUDA graph of
    its own with ``cuda_graphs``. ``multi_kernel``, ``bilinear_kernel``: the ``lite3r`` backend's
    options of those names.

    Returns what to call (the compiled module, or ``module`` itself when regional) and the regions
    compiled, as ``"path: count x Class"`` (empty unless regional).
    """
    from lite3r_compile.backends.regions import compile_blocks
    from lite3r_compile.backends.registration import lite3r_backend

    options = {"sla": False, "fp8": False, "cuda_graphs": cuda_graphs, "multi_kernel": multi_kernel,
               "bilinear_kernel": bilinear_kernel}
    backend = functools.partial(lite3r_backend, options=options)
    if not regional:
        return torch.compile(module, backend=backend, dynamic=dynamic), []
    groups = compile_blocks(module, backend=backend, dynamic=dynamic)
    return module, [f"{g.path}: {g.count} x {g.class_name}" for g in groups]


class EvalBackend:
    """Installed as ``student.forward`` by :func:`install_eval_backend`.

    Training mode, calls made while ``torch.compile`` traces the student, and students with
    forward hooks on any submodule run the student's own forward (hooks fire, as the user expects;
    one :class:`EagerForHooksWarning`). Every other eval-mode call runs the deployed form, built
    on first use. Before each call the student's parameters and buffers are checked: an in-place
    change (optimizer step, ``load_state_dict``) re-quantizes the FP8 weights in place; a
    replaced or moved tensor (``.to(device)``, a swapped module) rebuilds the deployed form.

    ``compile=None`` compiles (Inductor) when the student is on a CUDA device and runs the lowered
    module eagerly elsewhere: on a CPU, a compile costs tens of seconds even for a toy model and
    the FP8 GEMMs are emulated anyway. ``compile=True`` compiles everywhere.
    """

    def __init__(self, student: nn.Module, backend: str, *, compile: bool | None = None,
                 cuda_graphs: bool | None = None, dynamic: bool | None = None) -> None:
        if backend not in DEPLOY_BACKENDS:
            raise ValueError(f"install_eval_backend: backend must be one of {DEPLOY_BACKENDS}, got {backend!r}")
        self.student = student
        self.backend = backend
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.dynamic = dynamic
        self.deployed: DeployedStudent | None = None
        self.signature: tuple[tuple, tuple] | None = None
        # made on the first eval call: a copied or unpickled router watches its own student
        self.watch: ModuleWatch | None = None
        self.builds = 0
        self.hooks_warned = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        student = self.student
        if student.training or torch.compiler.is_compiling():
            return type(student).forward(student, *args, **kwargs)
        state = self._look()
        if state.hooked:
            if not self.hooks_warned:
                self.hooks_warned = True
                warnings.warn(
                    f"{type(student).__name__} has forward hooks on its modules: eval-mode calls run "
                    f"the eager student so that they fire, not the {self.backend!r} backend",
                    EagerForHooksWarning,
                    stacklevel=2,
                )
            return type(student).forward(student, *args, **kwargs)
        return self._deployed_for(state)(*args, **kwargs)

    def current(self) -> DeployedStudent:
        """The deployed form for the student's weights as they are now."""
        return self._deployed_for(self._look())

    def _look(self) -> ModuleState:
        if self.watch is None:
            self.watch = ModuleWatch(self.student)
        return self.watch.look()

    def _deployed_for(self, state: ModuleState) -> DeployedStudent:
        signature = (state.structure, state.versions)
        # built and refreshed as normal tensors, even on a first call under torch.inference_mode
        with torch.inference_mode(False):
            if self.deployed is None or signature[0] != self.signature[0]:
                compile = self.compile
                if compile is None:
                    compile = model_device(self.student).type == "cuda"
                self.deployed = deploy(self.student, self.backend, compile=compile,
                                       cuda_graphs=self.cuda_graphs, dynamic=self.dynamic,
                                       warn_emulation=False)
                self.builds += 1
            elif signature[1] != self.signature[1]:
                self.deployed.refresh()
        self.signature = signature
        return self.deployed

    def __getstate__(self) -> dict[str, Any]:
        # a copied or pickled student builds its own deployed form
        state = dict(self.__dict__)
        state["deployed"] = None
        state["signature"] = None
        state["watch"] = None
        return state


def install_eval_backend(student: nn.Module, backend: str, **options: Any) -> EvalBackend:
    """Route ``student``'s eval-mode calls to its deployed ``backend`` form (see
    :class:`EvalBackend`); ``options`` are :class:`EvalBackend`'s (``compile``, ``cuda_graphs``,
    ``dynamic``). Returns the installed router (``student.forward``)."""
    router = EvalBackend(student, backend, **options)
    student.forward = router
    return router


__all__ = [
    "DEPLOY_BACKENDS",
    "DeployRecord",
    "DeployedStudent",
    "EagerForHooksWarning",
    "EvalBackend",
    "compile_for_inference",
    "deploy",
    "inference_copy",
    "install_eval_backend",
    "lower_fp8",
]
