"""Saving and loading a deployable student: distill once, deploy elsewhere without the teacher.

``save_deployable(student, path)`` writes one ``.safetensors`` file holding the deployed form of
the student (:func:`lite3r_compile.backends.deploy.deploy`, not compiled): float8 e4m3 weights of
the FP8 layers with their float32 scales, the SLA projections ``proj_l``, every other weight and
buffer of the state dict, and string metadata:

    lite3r.format        "1"
    lite3r.backend       "fp8" / "inductor" (the student's backend; "eager" saves as "fp8")
    lite3r.config        the LiteConfig as JSON
    lite3r.model_spec    how to build the architecture: a zoo preset name ("vggt-tiny") or
                         "package.module:factory" (a callable with no arguments); "" if not given
    lite3r.model_class   the student's class, checked at load
    lite3r.example_inputs  shapes and dtypes of the inputs the attention was captured with
    lite3r.sites         the rewritten attention sites, checked at load
    lite3r.aliases       tensors stored once under another name (tied weights)
    lite3r.torch_version / lite3r.version

``load_deployable(path)`` builds the architecture from the spec (or takes ``model=`` as the
skeleton; its weights are not used), applies the same rewrite with :func:`lite3r_compile.lite` on
inputs of the recorded shapes, lowers it the same way and loads the tensors: the result is a
:class:`~lite3r_compile.backends.deploy.DeployedStudent` computing what the saved student did.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import warnings
from importlib import metadata as importlib_metadata
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lite3r_compile.backends.deploy import DeployedStudent, compile_for_inference, deploy
from lite3r_compile.config import FP8Config, LiteConfig
from lite3r_compile.sla.config import SLAConfig

FORMAT_VERSION = "1"
_KEY = "lite3r."


class DeployableFormatError(ValueError):
    """A deployable-student file is missing something or does not match the model it is loaded
    into."""


# ---------------------------------------------------------------------------------------------
# LiteConfig <-> JSON
# ---------------------------------------------------------------------------------------------


def config_to_json(config: LiteConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> LiteConfig:
    data = json.loads(text)
    overrides = tuple((glob, SLAConfig(**sla)) for glob, sla in data.pop("sla_overrides", ()))
    return LiteConfig(
        sla=SLAConfig(**data.pop("sla")),
        fp8=FP8Config(**data.pop("fp8")),
        sla_overrides=overrides,
        # JSON has lists where the config has tuples of globs
        **{name: tuple(value) if isinstance(value, list) else value for name, value in data.items()},
    )


# ---------------------------------------------------------------------------------------------
# example inputs <-> JSON (shapes and dtypes only)
# ---------------------------------------------------------------------------------------------


def _input_spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(
        f"save_deployable: example input of type {type(value).__name__} cannot be recorded; use "
        "tensors and plain numbers"
    )


def example_inputs_to_json(example_inputs: Any) -> str:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        return json.dumps({"kwargs": {k: _input_spec(v) for k, v in example_inputs.items()}})
    leaves, _ = pytree.tree_flatten(tuple(example_inputs))
    if len(leaves) != len(example_inputs):
        raise TypeError("save_deployable: example_inputs must be a flat tuple of tensors and numbers or a dict")
    return json.dumps({"args": [_input_spec(v) for v in example_inputs]})


def _make_input(spec: dict[str, Any], generator: torch.Generator, device: torch.device) -> Any:
    if "value" in spec:
        return spec["value"]
    dtype = getattr(torch, spec["dtype"])
    if dtype.is_floating_point:
        return torch.rand(spec["tensor"], generator=generator).to(device=device, dtype=dtype)
    return torch.zeros(spec["tensor"], dtype=dtype, device=device)


def example_inputs_from_json(text: str, device: torch.device) -> tuple | dict:
    """Inputs of the recorded shapes (floating tensors uniform in [0, 1), as images are)."""
    data = json.loads(text)
    generator = torch.Generator().manual_seed(0)
    if "kwargs" in data:
        return {k: _make_input(v, generator, device) for k, v in data["kwargs"].items()}
    return tuple(_make_input(v, generator, device) for v in data["args"])


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


def _lite3r_version() -> str:
    try:
        return importlib_metadata.version("lite3r-compile")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _rewritten_sites(student: nn.Module) -> list[str]:
    return sorted(s.path for s in student.lite3r_record.passes.artifacts.get("sla_sites", []) if s.rewritten)


def _recorded_example_inputs(student: nn.Module) -> Any:
    recorded = student.lite3r_record.passes.artifacts.get("example_inputs")
    if recorded is not None:
        return recorded
    maker = getattr(student, "example_inputs", None)
    if callable(maker):
        return maker()
    return None


def _deploy_backend(student: nn.Module) -> str:
    backend = student.lite3r_record.backend
    return "fp8" if backend == "eager" else backend


def save_deployable(student: nn.Module, path: str | os.PathLike, *, model_spec: str | None = None,
                    example_inputs: Any = None) -> None:
    """Write ``student`` (from :func:`lite3r_compile.lite`, trained or not) as a deployable
    ``.safetensors`` file (see the module docstring).

    ``model_spec``: a zoo preset name or ``"package.module:factory"`` that builds the dense
    architecture; without it, :func:`load_deployable` needs ``model=``. ``example_inputs``: the
    inputs to capture the attention with at load (their shapes and dtypes are stored); default:
    those ``lite()`` was given, else the model's ``example_inputs()``.
    """
    from safetensors.torch import save_file

    from lite3r_compile.api import is_student

    if not is_student(student):
        raise TypeError(
            f"save_deployable: {type(student).__name__} is not a lite3r student (no lite3r_record); "
            "build it with lite3r_compile.lite(model)"
        )
    if model_spec is not None:
        _check_spec(model_spec)
    example_inputs = _recorded_example_inputs(student) if example_inputs is None else example_inputs
    if example_inputs is None:
        raise ValueError(
            f"save_deployable: {type(student).__name__} has no example_inputs() and lite() was not "
            "given example_inputs; pass example_inputs=(...) so that load_deployable can capture "
            "the attention again"
        )
    backend = _deploy_backend(student)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FP8 emulation is irrelevant to what is stored
        deployed = deploy(student, backend, compile=False)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_storage: dict[tuple, str] = {}
    for name, tensor in deployed.module.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype) if tensor.numel() else None
        if key is not None and key in first_by_storage:
            aliases[name] = first_by_storage[key]
            continue
        if key is not None:
            first_by_storage[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    meta = {
        "format": FORMAT_VERSION,
        "backend": backend,
        "config": config_to_json(student.lite3r_record.config),
        "model_spec": model_spec or "",
        "model_class": f"{type(student).__module__}.{type(student).__qualname__}",
        "example_inputs": example_inputs_to_json(example_inputs),
        "sites": json.dumps(_rewritten_sites(student)),
        "aliases": json.dumps(aliases, sort_keys=True),
        "torch_version": torch.__version__,
        "version": _lite3r_version(),
    }
    save_file(tensors, os.fspath(path), metadata={_KEY + k: v for k, v in meta.items()})


def _check_spec(spec: str) -> None:
    from lite3r_compile.models_zoo import list_presets

    if spec in list_presets():
        return
    if ":" not in spec:
        raise ValueError(
            f"model_spec {spec!r} is neither a zoo preset ({', '.join(list_presets())}) nor "
            "'package.module:factory'"
        )


def build_from_spec(spec: str, device: torch.device | str | None = None) -> nn.Module:
    """The dense architecture a model spec names (random weights)."""
    from lite3r_compile.models_zoo import create, list_presets

    if spec in list_presets():
        return create(spec, device=device)
    _check_spec(spec)
    module_name, _, factory_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise DeployableFormatError(f"model spec {spec!r}: cannot import {factory_name!r} from {module_name!r} ({err})") from err
    if device is None:
        return factory()
    with torch.device(device):
        return factory()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``lite3r.*`` metadata of a deployable file, without the prefix."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {k.removeprefix(_KEY): v for k, v in raw.items() if k.startswith(_KEY)}
    missing = [k for k in ("format", "backend", "config", "model_class", "example_inputs", "sites", "aliases")
               if k not in meta]
    if missing:
        raise DeployableFormatError(
            f"{os.fspath(path)} is not a lite3r deployable student: metadata {missing} missing "
            "(write it with lite3r_compile.backends.serialization.save_deployable)"
        )
    if meta["format"] != FORMAT_VERSION:
        raise DeployableFormatError(f"{os.fspath(path)}: format {meta['format']!r}, this version reads {FORMAT_VERSION!r}")
    return meta


def load_deployable(path: str | os.PathLike, *, model: nn.Module | None = None,
                    device: torch.device | str | None = None, compile: bool = False,
                    cuda_graphs: bool = False) -> DeployedStudent:
    """Rebuild the deployed student saved by :func:`save_deployable` (see the module docstring).

    ``model``: the dense architecture to rebuild on (moved to ``device``; its weights are not
    used and not changed); default: built from the file's model spec. ``device``: where to
    build and load (default CPU). ``compile``/``cuda_graphs``: as :func:`deploy`'s.
    Raises :class:`DeployableFormatError` naming what is missing or does not match.
    """
    from safetensors.torch import load_file

    from lite3r_compile.api import lite

    meta = read_metadata(path)
    device = torch.device(device or "cpu")
    if model is None:
        if not meta.get("model_spec"):
            raise DeployableFormatError(
                f"{os.fspath(path)} records no model spec; pass model= (the dense architecture, "
                f"a {meta['model_class']})"
            )
        model = build_from_spec(meta["model_spec"], device=device)
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if model_class != meta["model_class"]:
        raise DeployableFormatError(
            f"{os.fspath(path)} holds a student of {meta['model_class']}, the skeleton is a {model_class}"
        )
    config = config_from_json(meta["config"])
    example_inputs = example_inputs_from_json(meta["example_inputs"], device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lite()'s warnings were given when the student was made
        student = lite(model.to(device), backend=meta["backend"], config=config, example_inputs=example_inputs)
    sites = _rewritten_sites(student)
    saved_sites = json.loads(meta["sites"])
    if sites != saved_sites:
        raise DeployableFormatError(
            f"{os.fspath(path)}: the saved student rewrote attention at {saved_sites}, the rebuilt one "
            f"at {sites}; load with the same architecture and lite3r version "
            f"({meta.get('version', 'unknown')})"
        )
    deployed = deploy(student, meta["backend"], compile=False, warn_emulation=False)
    tensors = load_file(os.fspath(path), device=str(device))
    for name, source in json.loads(meta["aliases"]).items():
        tensors[name] = tensors[source]
    expected = deployed.module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DeployableFormatError(
            f"{os.fspath(path)} does not match the rebuilt student: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise DeployableFormatError(
                f"{os.fspath(path)}: {name} is {tuple(tensor.shape)} {tensor.dtype} in the file, "
                f"{tuple(want.shape)} {want.dtype} in the rebuilt student"
            )
    # The module shares the skeleton's storage: assign the loaded tensors instead of copying into
    # the skeleton (the caller's model keeps its own weights).
    deployed.module.load_state_dict(tensors, strict=True, assign=True)
    return deploy_loaded(deployed, compile=compile, cuda_graphs=cuda_graphs, regional=config.regional_compile,
                         multi_kernel=config.inductor_multi_kernel, bilinear_kernel=config.bilinear_kernel)


def deploy_loaded(deployed: DeployedStudent, *, compile: bool, cuda_graphs: bool,
                  regional: bool = False, multi_kernel: bool = False, bilinear_kernel: bool = True) -> DeployedStudent:
    """A loaded deployed module as a standalone :class:`DeployedStudent` (no student to refresh
    from), compiled on request (block by block with ``regional``; ``multi_kernel`` as
    :func:`~lite3r_compile.backends.deploy.compile_for_inference`'s)."""
    module = deployed.module
    record = dataclasses.replace(deployed.record, compiled=compile, cuda_graphs=cuda_graphs and compile,
                                 multi_kernel=multi_kernel and compile)
    runner = module
    if compile:
        runner, record.compiled_blocks = compile_for_inference(
            module, cuda_graphs=record.cuda_graphs, regional=regional, multi_kernel=record.multi_kernel,
            bilinear_kernel=bilinear_kernel)
    return DeployedStudent(module, record, [], runner)


__all__ = [
    "DeployableFormatError",
    "FORMAT_VERSION",
    "build_from_spec",
    "config_from_json",
    "config_to_json",
    "example_inputs_from_json",
    "example_inputs_to_json",
    "load_deployable",
    "read_metadata",
    "save_deployable",
]
