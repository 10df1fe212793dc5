"""Getting FX graphs out of real model code, one module at a time.

Whole-model tracing fails on real 3D-reconstruction code (RoPE calling ``int(pos.max())``,
data-dependent view reordering, in-place token writes). Capture therefore works per module:

1. :func:`record_module_calls` runs the model once on example inputs with forward hooks and keeps,
   for every submodule, the *signature* of each distinct call: shapes, dtypes and devices of the
   tensors going in and coming out (:class:`TensorSpec`) and the plain Python values. Real
   arguments are cloned only within a small budget (``KEEP_REAL_BYTES``), so this works for
   billion-parameter models, and on ``meta`` (where ``.item()`` gets a stand-in value and the
   modules that needed one are listed).
2. :func:`capture_module` traces one module *shallowly*: every child module stays a single
   ``call_module`` node, so data-dependent code in a child (a RoPE module, a position getter) never
   stops the parent's own forward from being captured. While tracing, every node is also run on
   fake tensors built from the recorded signature (children's outputs come from their recorded
   calls), which gives each node ``node.meta["val"]`` (shapes for the analysis) and lets Python
   control flow that asks about shapes or dtypes (``if x.shape[1] > 1``,
   ``math.sqrt(q.size(-1))``, ``len(x)``) take the recorded path. Every such decision is written
   into the graph as a ``torch._assert`` guard, so the captured module stays shape-generic where
   the code is, and fails loudly, never silently, where it was specialised.
3. A forward that branches on tensor *values* (``if not torch.isfinite(x).all()``) is traced
   again on its real recorded arguments; the branch taken is guarded the same way.
4. Modules that still cannot be captured are listed as :class:`CaptureFailure` (path, reason).
   Their children are captured on their own all the same (every module that ran is captured
   independently), which is what "recursing into" a module amounts to with shallow graphs.

Repeated blocks (same class, attributes, parameter shapes and call signature) are traced once
and the graph is re-bound to each; running modules during capture leaves no trace in them
(:func:`preserved_python_state`).
"""

from __future__ import annotations

import contextlib
import copy
import dis
import inspect
import operator
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree


class CaptureError(RuntimeError):
    """The model, or one module of it, could not be run or captured; the message names it.
    ``data_dependent`` is set when tracing stopped at Python control flow on tensor values."""

    data_dependent: bool = False
    path: str = ""


class _DataDependentTrace(fx.proxy.TraceError):
    """Python needed the value of a tensor that fake tensors cannot give."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of a tensor seen at capture (the tensor itself is not kept)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(int(s) for s in tensor.shape), tensor.dtype, tensor.device)


def _to_spec(value: Any) -> Any:
    return TensorSpec.of(value) if isinstance(value, torch.Tensor) else value


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, TensorSpec)


def signature_key(tree: Any) -> tuple:
    """A hashable key of an args/kwargs tree whose tensors are :class:`TensorSpec`: two calls
    with equal keys see equal shapes, dtypes and plain Python values."""
    leaves, spec = pytree.tree_flatten(tree)
    return (
        tuple(leaf if isinstance(leaf, _PLAIN) else f"<{type(leaf).__qualname__}>" for leaf in leaves),
        str(spec),
    )


@dataclass
class ModuleCall:
    """One distinct call of a module: argument and output trees with tensors as TensorSpecs."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any
    count: int = 1

    @property
    def key(self) -> tuple:
        return signature_key((self.args, self.kwargs))


@dataclass
class ModuleRecord:
    """Everything recorded about one submodule: its distinct calls, in first-seen order."""

    path: str
    module: nn.Module
    order: int
    calls: list[ModuleCall] = field(default_factory=list)
    real_call: ModuleCall | None = None  # clones of the first call's real arguments, if kept

    def find_call(self, args: tuple, kwargs: Mapping[str, Any]) -> ModuleCall | None:
        key = signature_key((tuple(args), dict(kwargs)))
        for call in self.calls:
            if call.key == key:
                return call
        return None


class CallRecords(dict):
    """``path -> ModuleRecord`` with a lookup by module identity: a module shared by several
    parents (one RoPE for all blocks) is recorded once, under its first path."""

    def by_module(self, module: nn.Module) -> ModuleRecord | None:
        index = self.__dict__.get("_index")
        if index is None or len(index) != len(self):
            index = self.__dict__["_index"] = {id(r.module): r for r in self.values()}
        return index.get(id(module))


def normalize_example_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``example_inputs`` as (args, kwargs). ``None`` asks the model's own ``example_inputs()``."""
    if example_inputs is None:
        maker = getattr(model, "example_inputs", None)
        if not callable(maker):
            raise ValueError(
                f"{type(model).__name__} needs example inputs to be captured: pass "
                "example_inputs=(args...) or {kwarg: value}, or give the model an "
                "example_inputs() method"
            )
        example_inputs = maker()
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tuple of positional arguments, a dict of keyword arguments or "
        f"a tensor, got {type(example_inputs).__name__}"
    )


_SCALAR_METHODS = {"item": None, "__int__": int, "__index__": int, "__float__": float,
                   "__bool__": bool}


@contextlib.contextmanager
def _meta_scalar_guesses(running: list[str], guessed: list[str]) -> Iterator[None]:
    """On meta tensors, ``.item()`` / ``int()`` / ``bool()`` have no value to give. Shapes of
    3D-reconstruction models do not depend on them (a RoPE table sized by ``int(pos.max())`` is
    only indexed), so a stand-in lets the shapes flow: True for bools, 0 for integers, 1.0 for
    floats. The modules where that happened are appended to ``guessed``. (Patching these five
    methods costs nothing per op, unlike a dispatch mode over the whole forward.)"""
    originals = {name: getattr(torch.Tensor, name) for name in _SCALAR_METHODS}

    def stand_in(name: str, original: Callable) -> Callable:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_meta:
                return original(self, *args, **kwargs)
            where = running[-1] if running else ""
            if where not in guessed:
                guessed.append(where)
            if self.dtype == torch.bool:
                value: Any = True
            elif self.dtype.is_floating_point or self.dtype.is_complex:
                value = 1.0
            else:
                value = 0
            cast = _SCALAR_METHODS[name]
            return cast(value) if cast is not None else value

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, stand_in(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# Real arguments of each module's first call are kept (cloned) up to this many bytes in all, so
# that data-dependent forwards of small models can be captured without running the model again.
KEEP_REAL_BYTES = 64 << 20


def record_module_calls(model: nn.Module, example_inputs: Any = None, *,
                        meta_guesses: list[str] | None = None,
                        keep_real_bytes: int = KEEP_REAL_BYTES) -> CallRecords:
    """Run ``model`` once on ``example_inputs`` (under ``torch.no_grad``) and record, for every
    submodule that runs, the signature of each distinct call. The root is recorded under ``""``.

    On a meta-device model, data-dependent scalars get stand-in values (see
    ``_meta_scalar_guesses``); the modules where that happened are appended to ``meta_guesses``.
    Raises :class:`CaptureError` naming the innermost module that was running when the model
    failed.
    """
    args, kwargs = normalize_example_inputs(model, example_inputs)
    records = CallRecords()
    paths = {id(m): p for p, m in model.named_modules()}
    running: list[str] = []
    handles = []
    kept: dict[str, ModuleCall] = {}
    budget = [keep_real_bytes]

    def pre_hook(module: nn.Module, a: tuple, k: dict) -> None:
        path = paths[id(module)]
        running.append(path)
        if path in kept or budget[0] <= 0:
            return
        tensors = [t for t in pytree.tree_leaves((a, k)) if isinstance(t, torch.Tensor)]
        size = sum(t.numel() * t.element_size() for t in tensors)
        if any(t.is_meta for t in tensors) or size > budget[0]:
            return
        budget[0] -= size
        kept[path] = ModuleCall(pytree.tree_map(_clone, tuple(a)), pytree.tree_map(_clone, dict(k)), None)

    def post_hook(module: nn.Module, a: tuple, k: dict, out: Any) -> None:
        path = running.pop() if running else paths[id(module)]
        record = records.get(path)
        if record is None:
            record = records[path] = ModuleRecord(path, module, len(records))
        call = ModuleCall(
            pytree.tree_map(_to_spec, tuple(a)),
            pytree.tree_map(_to_spec, dict(k)),
            pytree.tree_map(_to_spec, out),
        )
        existing = record.find_call(call.args, call.kwargs)
        if existing is None:
            record.calls.append(call)
        else:
            existing.count += 1

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    guessed: list[str] = []
    on_meta = not _runs_for_real(model, (args, kwargs))
    try:
        with torch.no_grad(), (_meta_scalar_guesses(running, guessed) if on_meta
                               else contextlib.nullcontext()):
            model(*args, **kwargs)
    except Exception as exc:
        where = running[-1] if running else ""
        culprit = model.get_submodule(where) if where else model
        name = f"module '{where}'" if where else "the root module"
        raise CaptureError(
            f"{type(model).__name__} failed on the example inputs in {name} "
            f"({type(culprit).__name__}): {type(exc).__name__}: {exc}. Check that the example "
            "inputs have the shapes, dtypes and device the model expects."
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    if meta_guesses is not None:
        meta_guesses.extend(guessed)
    for path, call in kept.items():
        if path in records:
            records[path].real_call = call
    return records


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


# --------------------------------------------------------------------------------------------
# Shallow tracing with values
# --------------------------------------------------------------------------------------------


class _Unknown:
    """The value of a node that could not be computed on fake tensors."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = _Unknown()


def node_value(node: Any) -> Any:
    """The fake value a captured node had at capture (``UNKNOWN`` if none)."""
    if isinstance(node, fx.Node):
        for key in ("val", "example_value"):
            if key in node.meta:
                return node.meta[key]
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return meta
        return UNKNOWN
    return node


def _is_real(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not tensor.is_meta and not is_fake(tensor)


class _ValueProxy(fx.Proxy):
    """A Proxy that knows the fake value of its node, so that Python can branch on shapes."""

    def _concrete(self, what: str) -> Any:
        value = node_value(self.node)
        if value is UNKNOWN or (isinstance(value, torch.Tensor) and not _is_real(value)):
            raise _DataDependentTrace(
                f"{what} of a traced value needs its concrete value, which is data-dependent or "
                f"unknown at capture (node {self.node.format_node()})"
            )
        return value

    def _guard(self, expected: Any, what: str) -> None:
        # Keep the decision in the graph: a different shape at run time fails loudly.
        if isinstance(expected, bool):
            cond = self if expected else self.tracer.create_proxy("call_function", operator.eq, (self, False), {})
        else:
            cond = self.tracer.create_proxy("call_function", operator.eq, (self, expected), {})
        self.tracer.create_proxy(
            "call_function",
            torch._assert,
            (cond, f"captured graph was specialised on {what} == {expected!r}; "
                   "this input takes another path: capture the module with such an input"),
            {},
        )

    def __bool__(self) -> bool:
        value = bool(self._concrete("bool()"))
        self._guard(value, f"bool({self.node.name})")
        return value

    def __int__(self) -> int:
        value = int(self._concrete("int()"))
        self._guard(value, f"int({self.node.name})")
        return value

    def __index__(self) -> int:
        value = operator.index(self._concrete("index()"))
        self._guard(value, f"index({self.node.name})")
        return value

    def __float__(self) -> float:
        value = float(self._concrete("float()"))
        self._guard(value, f"float({self.node.name})")
        return value

    def __len__(self) -> int:
        value = node_value(self.node)
        if isinstance(value, torch.Tensor):
            length = int(value.shape[0])
            size = self.tracer.create_proxy("call_method", "size", (self, 0), {})
        else:
            length = len(self._concrete("len()"))
            size = self.tracer.create_proxy("call_function", _SEQUENCE_LENGTH, (self,), {})
            size.node.meta["is_wrapped"] = True  # codegen then re-wraps it for re-tracing
        size._guard(length, f"len({self.node.name})")
        return length

    def __iter__(self) -> Iterator[fx.Proxy]:
        value = node_value(self.node)
        if isinstance(value, (torch.Size, torch.Tensor)):
            return iter([self[i] for i in range(len(self))])  # the rank / length is guarded
        if isinstance(value, (tuple, list)):
            # A returned tuple's length is fixed by the code that builds it, not by shapes.
            return iter([self[i] for i in range(len(value))])
        # Same rule as FX: tuple unpacking of an unknown value is fine, other iteration is not.
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is not None:
            instructions = list(dis.get_instructions(caller.f_code))
            for inst in instructions:
                if inst.offset == caller.f_lasti and inst.opname == "UNPACK_SEQUENCE":
                    return iter([self[i] for i in range(inst.argval)])
        raise fx.proxy.TraceError(f"cannot iterate over {self.node.format_node()} of unknown length")

    def __setitem__(self, key: Any, value: Any) -> None:
        # In-place token writes (``x[:, :, 0] = cam_token``): a side-effecting node, which dead
        # code elimination keeps.
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, name: str) -> Any:
        # Private names are probes by torch itself (``Parameter.__instancecheck__`` reads
        # ``_is_param``), not tensor methods model code calls.
        if name.startswith("_"):
            raise AttributeError(name)
        return _ValueAttribute(self, name)


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    pass


def _xformers_attention_functions() -> tuple[Callable, ...]:
    """xFormers' memory-efficient attention entry points, when xFormers is importable."""
    found = []
    for module_name in ("xformers.ops", "xformers.ops.fmha"):
        module = sys.modules.get(module_name)
        fn = getattr(module, "memory_efficient_attention", None) if module is not None else None
        if callable(fn) and fn not in found:
            found.append(fn)
    return tuple(found)


def is_xformers_attention(target: Any) -> bool:
    """Whether an FX call target is xFormers' ``memory_efficient_attention``: the Python function
    (its module names xformers) or a torch op of that name in an xformers namespace."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        qualified = (target._qualified_op_name if isinstance(target, torch._ops.OpOverloadPacket)
                     else target.name())
        namespace, _, name = qualified.partition("::")
        return "xformers" in namespace and name.split(".")[0] == "memory_efficient_attention"
    return (
        callable(target)
        and getattr(target, "__name__", "") == "memory_efficient_attention"
        and "xformers" in str(getattr(target, "__module__", ""))
    )


def sequence_length(value: Any) -> int:
    """``len(value)`` as a graph call (captured graphs guard the lengths they unpacked)."""
    return len(value)


def torch_factory(name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``torch.<name>(*args, **kwargs)`` as a graph call: sizes read at run time."""
    return getattr(torch, name)(*args, **kwargs)


# Generated code calls these; FX must keep them as calls when it re-traces that code (which
# unpickling a GraphModule does).
fx.wrap("sequence_length")
fx.wrap("torch_factory")
# While tracing, FX patches the wrapped names in this module's globals; nodes must target the
# functions themselves.
_SEQUENCE_LENGTH = sequence_length
_TORCH_FACTORY = torch_factory


# torch factories whose size arguments the Python argument parser reads as ints, so proxies
# there never reach ``__torch_function__``: they are turned into nodes while tracing.
_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "eye",
              "linspace", "tensor")


@contextlib.contextmanager
def _leaf_factories(tracer: fx.Tracer) -> Iterator[None]:
    originals = {name: getattr(torch, name) for name in _FACTORIES}

    def leaf(fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
                proxy = tracer.create_proxy("call_function", _TORCH_FACTORY, (fn.__name__, *args), kwargs)
                proxy.node.meta["is_wrapped"] = True
                return proxy
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(torch, name, leaf(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


@contextlib.contextmanager
def _leaf_xformers(tracer: fx.Tracer) -> Iterator[None]:
    """Keep ``xformers.ops.memory_efficient_attention`` one node while tracing, also when the
    model calls it through the module attribute (``xops.memory_efficient_attention``), which
    ``autowrap_functions`` (globals only) does not see."""
    patched = []
    for module_name in ("xformers.ops", "xformers.ops.fmha"):
        module = sys.modules.get(module_name)
        fn = getattr(module, "memory_efficient_attention", None) if module is not None else None
        if not callable(fn):
            continue

        def leaf(*args: Any, _fn: Callable = fn, **kwargs: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
                return tracer.create_proxy("call_function", _fn, args, kwargs)
            return _fn(*args, **kwargs)

        setattr(module, "memory_efficient_attention", leaf)
        patched.append((module, fn))
    try:
        yield
    finally:
        for module, fn in patched:
            setattr(module, "memory_efficient_attention", fn)


def _untraced(fn: Callable) -> contextlib.AbstractContextManager:
    """Undo FX's tracing patches (``nn.Module.__call__``/``__getattr__``) while a child module
    runs for a value, so that its calls are executed, not recorded into the graph. (Plain torch
    ops run as they are: reverting costs more than the op.)"""
    revert = getattr(fx._symbolic_trace, "_maybe_revert_all_patches", None)
    if revert is None or not isinstance(fn, nn.Module):
        return contextlib.nullcontext()
    return revert()


class _FakeRunner:
    """Runs ops on fake tensors for the values of traced nodes; inputs are TensorSpecs, and
    recorded calls of children stand in for running them."""

    uses_records = True

    def __init__(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=True)

    def from_spec(self, value: Any) -> Any:
        def make(leaf: Any) -> Any:
            if isinstance(leaf, TensorSpec):
                with self.mode:
                    return torch.empty(leaf.shape, dtype=leaf.dtype, device=leaf.device)
            return leaf

        return pytree.tree_map(make, value)

    def fake(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.mode.from_tensor(tensor, static_shapes=True)

    def run(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        with _untraced(fn), self.mode, torch.no_grad():
            return fn(*args, **kwargs)


class _RealRunner:
    """Runs ops on real tensors (kept inputs of one call): data-dependent control flow can then
    be decided, and is guarded in the graph like shape decisions."""

    uses_records = False

    def from_spec(self, value: Any) -> Any:
        return value

    def fake(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def run(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        with _untraced(fn), torch.no_grad():
            return fn(*args, **kwargs)


class _ShallowValueTracer(fx.Tracer):
    """Traces one module's own forward; children stay ``call_module`` nodes. Every node gets
    ``meta["val"]``: its value on fake tensors (``UNKNOWN`` where that cannot be computed)."""

    def __init__(self, path: str, records: Mapping[str, ModuleRecord], runner: _FakeRunner | _RealRunner,
                 placeholder_values: Mapping[str, Any]) -> None:
        super().__init__(autowrap_functions=_xformers_attention_functions())
        self.path = path
        self.records = records if isinstance(records, CallRecords) else CallRecords(records)
        self.runner = runner
        self.placeholder_values = placeholder_values

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        # every node, also those FX makes without a proxy (get_attr of tensor attributes)
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if "val" not in node.meta and kind != "output":
            node.meta["val"] = self._value_of(node)
        return node

    def _value_of(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            name = node.target.lstrip("*")
            return self.placeholder_values.get(name, UNKNOWN)
        if node.op == "get_attr":
            attr = _plain_getattr(self.root, node.target)
            return self.runner.fake(attr) if isinstance(attr, torch.Tensor) else attr
        args, kwargs = pytree.tree_map(node_value, (node.args, node.kwargs))
        if any(leaf is UNKNOWN for leaf in pytree.tree_leaves((args, kwargs))):
            return UNKNOWN
        try:
            if node.op == "call_function":
                return self.runner.run(node.target, args, kwargs)
            if node.op == "call_method":
                return self.runner.run(getattr(args[0], node.target), args[1:], kwargs)
            if node.op == "call_module":
                return self._child_value(node.target, args, kwargs)
        except Exception:
            return UNKNOWN
        return UNKNOWN

    def _child_value(self, target: str, args: tuple, kwargs: dict) -> Any:
        # A recorded call with the same signature gives the output without running the child
        # (it may be data-dependent, or on meta); otherwise run it on fake tensors.
        # by identity: a module shared by several parents is recorded under its first path
        child = self.root.get_submodule(target)
        record = self.records.by_module(child) if self.runner.uses_records else None
        if record is not None:
            call = record.find_call(
                pytree.tree_map(_spec_of_fake, tuple(args)), pytree.tree_map(_spec_of_fake, kwargs)
            )
            if call is not None:
                return self.runner.from_spec(call.output)
        return self.runner.run(child, args, kwargs)


def _plain_getattr(root: nn.Module, target: str) -> Any:
    """``root.<target>`` read from the module dicts: while tracing, FX patches
    ``nn.Module.__getattr__`` to create proxies, which must not recurse into the tracer."""
    owner: Any = root
    *parents, name = target.split(".")
    for part in parents:
        owner = owner._modules.get(part) if isinstance(owner, nn.Module) else None
        if owner is None:
            return UNKNOWN
    if isinstance(owner, nn.Module):
        for table in (owner._parameters, owner._buffers, owner._modules):
            if name in table:
                return table[name]
    return owner.__dict__.get(name, UNKNOWN)


def _spec_of_fake(value: Any) -> Any:
    return TensorSpec.of(value) if isinstance(value, torch.Tensor) else value


@dataclass
class CapturedModule:
    """A module's own forward as an FX graph. ``graph_module`` shares the module's children,
    parameters and buffers (same objects, same names); nodes carry ``meta["val"]`` (fake values
    at the recorded call)."""

    path: str
    module: nn.Module
    graph_module: fx.GraphModule
    call: ModuleCall
    method: str = "symbolic_trace"


@dataclass(frozen=True)
class CaptureFailure:
    """A module whose own forward could not be captured, and why."""

    path: str
    module_type: str
    reason: str


def _bind_call(module: nn.Module, call: ModuleCall) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the recorded call into traced inputs (tensors, by parameter name) and concrete
    arguments (plain values and defaults, which FX specialises and guards)."""
    signature = inspect.signature(module.forward)
    bound = signature.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    traced: dict[str, Any] = {}
    concrete: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if value:
                raise CaptureError(
                    f"forward of {type(module).__name__} takes *args/**kwargs and was called "
                    "with some; shallow tracing needs named parameters"
                )
            continue
        has_tensor = any(isinstance(leaf, (TensorSpec, torch.Tensor)) for leaf in pytree.tree_leaves(value))
        if has_tensor:
            traced[name] = value
        elif isinstance(value, (int, float, bool, str, type(None), torch.dtype)) or (
            isinstance(value, tuple) and all(isinstance(v, (int, float, bool, str)) for v in value)
        ):
            concrete[name] = value
        else:
            raise CaptureError(
                f"forward argument '{name}' of {type(module).__name__} is a "
                f"{type(value).__name__}, which shallow tracing cannot stand in for"
            )
    return traced, concrete


def graph_module_like(module: nn.Module, graph: fx.Graph,
                      constants_from: nn.Module | None = None) -> fx.GraphModule:
    """A GraphModule running ``graph`` with *all* of ``module``'s children, parameters and
    buffers, the same objects under the same names (FX alone would copy only those the graph
    uses, and rebuild nested containers), so state-dict keys and checkpoints are unchanged.

    Tensor constants the tracer created (``_tensor_constant0``: plain tensor attributes used in
    the forward) are taken from ``module`` or, when re-binding a captured graph to another
    module of the same structure, from ``constants_from`` (the captured GraphModule).
    """
    holder = nn.Module()
    holder._modules = dict(module._modules)
    holder._parameters = dict(module._parameters)
    holder._buffers = dict(module._buffers)
    for node in graph.nodes:
        if node.op != "get_attr" or "." in str(node.target) or str(node.target) in holder._buffers:
            continue
        name = str(node.target)
        if name in holder._parameters:
            continue
        for source in (module, constants_from):
            value = source.__dict__.get(name) if source is not None else None
            if value is None and source is not None:
                value = source._buffers.get(name)
            if value is not None:
                setattr(holder, name, value)
                break
    gm = fx.GraphModule(holder, graph, class_name=type(module).__name__)
    for name in list(gm._buffers):
        if name not in module._buffers:
            # FX registers plain tensor attributes as buffers; keep them out of the state dict
            gm._non_persistent_buffers_set.add(name)
    for name, child in module.named_children():
        gm._modules[name] = child
    for name, param in module._parameters.items():
        if name not in gm._parameters:
            gm.register_parameter(name, param)
    for name, buf in module._buffers.items():
        gm._buffers[name] = buf
        if name in module._non_persistent_buffers_set:
            gm._non_persistent_buffers_set.add(name)
    gm.train(module.training)
    return gm


def _restore_argument_names(graph: fx.Graph, module: nn.Module) -> None:
    """FX renames the placeholders of concrete arguments (``pos`` -> ``pos_1``); callers pass
    them by keyword (``attn(x, pos=None)``), so the forward must keep the original names."""
    names = set(inspect.signature(module.forward).parameters)
    for node in graph.nodes:
        if node.op != "placeholder" or node.target in names:
            continue
        base, _, suffix = str(node.target).rpartition("_")
        if suffix.isdigit() and base in names:
            node.target = base


def _commit_inplace_ops(graph: fx.Graph) -> None:
    """Make in-place method results visible in the dataflow: after ``a.mul_(s)``, later uses of
    ``a`` read the ``mul_`` node (which is ``a``). Semantics are unchanged (``mul_`` returns its
    input); the analysis then sees ``softmax(mul_)`` instead of ``softmax(a)``."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_method" or not isinstance(node.target, str):
            continue
        name = node.target
        if not (name.endswith("_") and not name.endswith("__")) or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        later = [u for u in source.users if u is not node and order[u] > order[node]]
        for user in later:
            user.replace_input_with(source, node)


def capture_module(path: str, module: nn.Module, records: Mapping[str, ModuleRecord],
                   runner: _FakeRunner | _RealRunner | None = None,
                   real_call: ModuleCall | None = None) -> CapturedModule:
    """Shallow-trace ``module`` (at ``path``).

    Values come from its first recorded call on fake tensors, or, with ``real_call`` (a call
    whose args/kwargs hold real tensors), from running on those: data-dependent branches are then
    decided and guarded. Raises :class:`CaptureError` (with the module path and the reason) if the
    forward cannot be traced.
    """
    record = records.get(path)
    if record is None or not record.calls:
        raise CaptureError(f"module '{path}' did not run on the example inputs; nothing to capture")
    call = real_call if real_call is not None else record.calls[0]
    if real_call is not None:
        runner = _RealRunner()
    runner = runner or _FakeRunner()
    try:
        traced, concrete = _bind_call(module, call)
        values = {name: runner.from_spec(value) for name, value in traced.items()}
        tracer = _ShallowValueTracer(path, records, runner, values)
        with _leaf_xformers(tracer), _leaf_factories(tracer):
            graph = tracer.trace(module, concrete_args=concrete or None)
    except CaptureError:
        raise
    except Exception as exc:
        error = CaptureError(
            f"could not trace the forward of '{path or '<root>'}' ({type(module).__name__}): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        )
        error.data_dependent = isinstance(exc, _DataDependentTrace)
        raise error from exc
    _commit_inplace_ops(graph)
    _restore_argument_names(graph, module)
    # Unpickling a GraphModule re-traces its generated code with this class and no arguments.
    graph._tracer_cls = fx.Tracer
    for node in graph.nodes:
        if isinstance(node.type, str):
            # ``from __future__ import annotations`` makes FX record annotations as strings,
            # which the generated code cannot pickle (``torch.save(model)``)
            node.type = None
    try:
        gm = graph_module_like(module, graph)
    except Exception as exc:
        raise CaptureError(
            f"the graph of '{path or '<root>'}' ({type(module).__name__}) does not compile back "
            f"to Python: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    method = "symbolic_trace" if real_call is None else "symbolic_trace (real values)"
    return CapturedModule(path, module, gm, record.calls[0], method)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _is_torch_leaf(module: nn.Module) -> bool:
    """A built-in torch.nn module without children (Linear, LayerNorm, Dropout, ...): its forward
    is one op, nothing to capture."""
    return type(module).__module__.startswith("torch.nn") and not any(True for _ in module.children())


@dataclass
class ModelCapture:
    """Every capturable module of a model: records, shallow graphs, and failures."""

    records: dict[str, ModuleRecord]
    modules: dict[str, CapturedModule]
    failures: list[CaptureFailure]
    meta_guesses: list[str] = field(default_factory=list)


def capture_model(model: nn.Module, example_inputs: Any = None, *,
                  skip: Callable[[str, nn.Module], bool] | None = None) -> ModelCapture:
    """Record ``model`` on ``example_inputs`` and shallow-capture each module that ran (except
    built-in leaf modules and those ``skip(path, module)`` rejects), in model order."""
    with preserved_python_state(model):
        return _capture_model(model, example_inputs, skip)


def _capture_model(model: nn.Module, example_inputs: Any,
                   skip: Callable[[str, nn.Module], bool] | None) -> ModelCapture:
    meta_guesses: list[str] = []
    records = record_module_calls(model, example_inputs, meta_guesses=meta_guesses)
    runner = _FakeRunner()
    modules: dict[str, CapturedModule] = {}
    failed: dict[str, str] = {}
    data_dependent: list[str] = []
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    # Repeated blocks (24 identical attention modules) are traced once: same class, same
    # structure and plain attributes, same call signature -> the same graph, re-bound.
    traced: dict[tuple, CapturedModule | CaptureError] = {}
    for path in sorted(records, key=lambda p: order.get(p, len(order))):
        module = records[path].module
        if _is_torch_leaf(module) or (skip is not None and skip(path, module)):
            continue
        key = _structure_key(module, records[path].calls[0])
        try:
            earlier = traced.get(key) if key is not None else None
            if isinstance(earlier, CaptureError):
                repeated = CaptureError(str(earlier).replace(f"'{earlier.path}'", f"'{path}'"))
                repeated.data_dependent = earlier.data_dependent
                raise repeated
            if earlier is not None:
                modules[path] = rebind_capture(earlier, path, module, records[path].calls[0])
            else:
                modules[path] = capture_module(path, module, records, runner)
                if key is not None:
                    traced[key] = modules[path]
        except CaptureError as exc:
            exc.path = path
            if key is not None and key not in traced:
                traced[key] = exc
            failed[path] = str(exc)
            if exc.data_dependent:
                data_dependent.append(path)
    if data_dependent and _runs_for_real(model, normalize_example_inputs(model, example_inputs)):
        # Data-dependent control flow (``if bool(x.isfinite().all())``, ``int(pos.max())``) can
        # be decided on the real inputs of the module: kept by the recording run for small
        # inputs, else one more forward keeps just those.
        real_calls = {p: records[p].real_call for p in data_dependent if records[p].real_call}
        missing = [p for p in data_dependent if p not in real_calls]
        if missing:
            real_calls.update(record_real_calls(model, example_inputs, missing))
        for path in data_dependent:
            if path not in real_calls:
                continue
            try:
                modules[path] = capture_module(path, records[path].module, records,
                                               real_call=real_calls[path])
            except CaptureError as exc:
                failed[path] = f"{failed[path]}; with real values: {exc}"
            else:
                del failed[path]
    failures = [CaptureFailure(p, type(records[p].module).__name__, r) for p, r in failed.items()]
    modules = dict(sorted(modules.items(), key=lambda item: order.get(item[0], len(order))))
    return ModelCapture(records, modules, failures, meta_guesses)


_MODULE_TABLES = ("_parameters", "_modules")


@contextlib.contextmanager
def preserved_python_state(model: nn.Module) -> Iterator[None]:
    """Undo what running modules during capture does to their Python state.

    Tracing runs forwards with proxies and children with fake tensors; code that caches
    (``self.frequency_cache[key] = ...``, ``self.last_shape = ...``) would keep proxies or fake
    tensors in the model. Every module's attributes, and the contents of its dict / list / set
    attributes (one level deep, in place), are put back as they were.
    """
    saved = []
    for module in model.modules():
        entries = []
        for key, value in module.__dict__.items():
            if key in _MODULE_TABLES:
                continue
            contents = None
            if isinstance(value, dict):
                contents = dict(value)
            elif isinstance(value, (list, set)):
                contents = type(value)(value)
            entries.append((key, value, contents))
        saved.append((module, set(module.__dict__), entries))
    try:
        yield
    finally:
        for module, keys, entries in saved:
            for key in set(module.__dict__) - keys:
                del module.__dict__[key]
            for key, value, contents in entries:
                module.__dict__[key] = value
                if contents is None or _same_contents(value, contents):
                    continue
                if isinstance(value, dict):
                    value.clear()
                    value.update(contents)
                elif isinstance(value, list):
                    value[:] = contents
                else:
                    value.clear()
                    value.update(contents)


def _same_contents(value: Any, contents: Any) -> bool:
    if isinstance(value, dict):
        return value.keys() == contents.keys() and all(value[k] is contents[k] for k in value)
    if isinstance(value, list):
        return len(value) == len(contents) and all(a is b for a, b in zip(value, contents))
    return value == contents


def _plain_state(module: nn.Module) -> tuple:
    items = []
    for name, value in sorted(module.__dict__.items()):
        if name.startswith("_"):
            continue
        try:
            hash(value)
        except TypeError:
            items.append((name, f"<{type(value).__qualname__}>"))
            continue
        items.append((name, value if not isinstance(value, torch.Tensor) else id(value)))
    tensors = tuple(
        (name, None if t is None else (tuple(t.shape), t.dtype, t.device))
        for name, t in (*module._parameters.items(), *module._buffers.items())
    )
    return type(module), tuple(items), tensors


def _structure_key(module: nn.Module, call: ModuleCall) -> tuple | None:
    """What decides a shallow trace: the module's class, plain attributes, tensor shapes, its
    children's (class, attributes, shapes) and the call signature. None when not hashable."""
    try:
        key = (_plain_state(module),
               tuple((name, _plain_state(child)) for name, child in module.named_children()),
               call.key)
        hash(key)
    except TypeError:
        return None
    return key


def copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` (node meta shared shallowly) and the old -> new node map."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    node_map: dict[fx.Node, fx.Node] = {}
    output = new.graph_copy(graph, node_map, return_output_node=True)
    new._codegen = copy.deepcopy(graph._codegen)
    if output is not None:
        value, old_output = output
        new_output = new.output(value, type_expr=getattr(old_output, "type", None))
        new_output.meta = copy.copy(old_output.meta)
    return new, node_map


def rebind_capture(captured: CapturedModule, path: str, module: nn.Module,
                   call: ModuleCall) -> CapturedModule:
    """The capture of an identical module, re-bound to ``module`` (its own children/params)."""
    graph, _ = copy_graph(captured.graph_module.graph)
    gm = graph_module_like(module, graph, constants_from=captured.graph_module)
    return CapturedModule(path, module, gm, call, captured.method)


def _runs_for_real(model: nn.Module, inputs: Any) -> bool:
    """Whether the model computes real values (not on meta)."""
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    tensors += list(model.parameters())[:1] + list(model.buffers())[:1]
    return not any(t.is_meta for t in tensors)


def record_real_calls(model: nn.Module, example_inputs: Any, paths: list[str]) -> dict[str, ModuleCall]:
    """Run the model again and keep (clones of) the real arguments of the first call of each
    module in ``paths``."""
    args, kwargs = normalize_example_inputs(model, example_inputs)
    kept: dict[str, ModuleCall] = {}
    handles = []

    def keeper(path: str) -> Callable:
        def hook(module: nn.Module, a: tuple, k: dict) -> None:
            if path not in kept:
                kept[path] = ModuleCall(pytree.tree_map(_clone, tuple(a)),
                                        pytree.tree_map(_clone, dict(k)), None)
        return hook

    for path in paths:
        module = model.get_submodule(path) if path else model
        handles.append(module.register_forward_pre_hook(keeper(path), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return kept


__all__ = [
    "CallRecords",
    "CaptureError",
    "CaptureFailure",
    "CapturedModule",
    "ModelCapture",
    "ModuleCall",
    "ModuleRecord",
    "TensorSpec",
    "UNKNOWN",
    "capture_model",
    "capture_module",
    "copy_graph",
    "rebind_capture",
    "graph_module_like",
    "is_xformers_attention",
    "node_value",
    "normalize_example_inputs",
    "preserved_python_state",
    "record_module_calls",
    "signature_key",
]
