"""The distillation trainer: FP8-aware QAT of a lite student with partial attention distillation.

The teacher runs frozen without gradients; the student runs in training mode, which is its FP8
fake-quantized form:

    loss = output_weight * output_loss(student(x), teacher(x))
         + attention_weight * attention_loss at the selected sites

What trains is ``DistillConfig.trainable``:

- ``"sla"`` (default, the Lite3R recipe): the parameters the student has trainable, i.e. the SLA
  ``proj_l`` weights and biases that :func:`lite3r_compile.lite` leaves trainable;
- ``"all"`` (full fine-tuning, the baseline the recipe is measured against): every floating-point
  parameter of the student. FP8 fake-quantized Linear layers train their weights through the
  straight-through estimator.

A trainable parameter never writes into the teacher: one that shares storage with the teacher
(every frozen weight of a ``lite()`` student does) gets a copy of its own before training, and
under autocast a bf16/fp16 one becomes a float32 master weight (the forward still computes in
bf16). With ``"all"`` the student so ends with a full float32 copy of its weights, all trainable.

AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast, optional activation
checkpointing of the transformer blocks. Under ``torchrun`` the same code trains data-parallel
(DistributedDataParallel, or FSDP2 ``fully_shard`` for students that do not fit on one GPU).
Checkpoints hold full tensors keyed by parameter name, so a run resumes on another number of
processes and under the other strategy.

Metrics log (``log_file``, JSON lines, one record every ``log_every`` steps, written by rank 0):

- ``step``, ``loss``, ``output_loss``, ``attention_loss``, ``lr``, ``scenes_per_s`` (all
  processes, since the run (or resume) started);
- ``proj_l_norm``: ``{site path: ||W_t||_F}`` for the ``proj_l.weight`` of every rewritten SLA
  site (site paths as in ``report(student)``, e.g. ``aggregator.global_blocks.0.attn``);
- ``proj_l_drift``: ``{site path: ||W_t - W_prev||_F / max(||W_t||_F, 1e-12)}``, the relative
  change since the previous record (the first record of a run, or of a resumed run, compares with
  the weights at its start; after ``lite()``'s zero initialisation that first value is 1).

The drift fields cost one device-to-host copy at a logging step and nothing at other steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lite3r_compile.distill import checkpoint as ckpt
from lite3r_compile.distill.losses import OutputLossConfig, attention_loss, capture_outputs, output_loss

SCOPE_NAMES = ("frame", "global", "cross", "self")
Trainable = Literal["sla", "all"]
TRAINABLE_MODES: tuple[str, ...] = get_args(Trainable)
# floor of the norm that divides a proj_l weight's change (its zero initialisation has norm 0)
DRIFT_EPS = 1e-12


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of a distillation run (every field has a working default).

    ``output_weight`` is 0.1 because the output term sums several O(1) terms (pose, depth, points
    and their confidences) where the attention term is a mean over sites: with equal weights the
    output gradient drowns partial attention distillation (on vggt-tiny, 30 steps: the held-out
    attention loss rose; at 0.1 both terms fell).
    ``attention_sites`` selects the sites of partial attention distillation: scope names
    (``"global"``, ``"frame"``, ``"cross"``, ``"self"``, ``"all"``), ``"#i"`` for the i-th
    rewritten site, or module-path globs. ``batch_size`` is per process.
    ``trainable``: ``"sla"`` trains what the student has trainable (the SLA projections after
    ``lite()``); ``"all"`` fine-tunes every floating-point parameter of the student (float32
    master weights; see the module docstring).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    autocast: bool = True
    activation_checkpointing: bool = False
    output_weight: float = 0.1
    attention_weight: float = 1.0
    attention_sites: tuple[str, ...] = ("global",)
    batch_size: int = 1
    num_views: int = 4
    num_workers: int = 0
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 1
    strategy: str = "ddp"
    trainable: Trainable = "sla"

    def __post_init__(self) -> None:
        if isinstance(self.attention_sites, str):
            object.__setattr__(self, "attention_sites", (self.attention_sites,))
        object.__setattr__(self, "attention_sites", tuple(self.attention_sites))
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.lr <= 0 or self.batch_size < 1 or self.num_views < 1:
            raise ValueError(f"DistillConfig: lr, batch_size and num_views must be positive: {self}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"DistillConfig.strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.trainable not in TRAINABLE_MODES:
            raise ValueError(
                f"DistillConfig.trainable must be 'sla' (train the SLA projections lite() left "
                f"trainable) or 'all' (fine-tune every parameter of the student), got {self.trainable!r}"
            )


@dataclass
class DistillResult:
    """What a run did: per-step losses (of this process's batches), timing and memory.

    ``trainable_params``: elements trained (tied parameters once); ``trainable_bytes`` their
    storage; ``optimizer_state_bytes``: AdamW's state on this process after the run (two float32
    moments per trained element, plus the step counters)."""

    losses: list[float] = field(default_factory=list)
    output_losses: list[float] = field(default_factory=list)
    attention_losses: list[float] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    peak_memory_bytes: int | None = None
    attention_sites: list[str] = field(default_factory=list)
    checkpoint: Path | None = None
    interrupted: bool = False
    trainable_params: int = 0
    trainable_bytes: int = 0
    optimizer_state_bytes: int = 0


# --- sites ---------------------------------------------------------------------------------------

def rewritten_sites(student: nn.Module) -> list[tuple[str, str]]:
    """(path, scope) of every attention site of ``student`` that runs Sparse Linear Attention."""
    from lite3r_compile.reporting import report

    return [(s.path, s.scope) for s in report(student).sites if s.sla]


def select_attention_sites(student: nn.Module, selectors: Sequence[str]) -> list[str]:
    """Resolve ``DistillConfig.attention_sites`` against the student's rewritten sites."""
    sites = rewritten_sites(student)
    chosen: list[str] = []
    for sel in selectors:
        if sel == "all":
            matched = [p for p, _ in sites]
        elif sel in SCOPE_NAMES:
            matched = [p for p, scope in sites if scope == sel]
        elif sel.startswith("#"):
            index = int(sel[1:])
            if not 0 <= index < len(sites):
                raise ValueError(f"attention site {sel}: the student has {len(sites)} rewritten sites")
            matched = [sites[index][0]]
        else:
            matched = [p for p, _ in sites if fnmatchcase(p, sel)]
        chosen += [p for p in matched if p not in chosen]
    if not chosen and sites and tuple(selectors) == DistillConfig.attention_sites:
        # The default asks for global attention; a model without any distils all its sites.
        warnings.warn("the student has no global-attention site: distilling at all rewritten sites", stacklevel=3)
        chosen = [p for p, _ in sites]
    if not chosen and sites:
        raise ValueError(f"attention_sites {tuple(selectors)} match none of the student's sites {[p for p, _ in sites]}")
    return chosen


def site_projections(student: nn.Module) -> dict[str, nn.Module]:
    """Rewritten site path -> the :class:`~lite3r_compile.sla.module.SparseLinearAttention` module
    inside it (whose ``proj_l`` trains)."""
    from lite3r_compile.sla.module import SparseLinearAttention

    out = {}
    for path, _ in rewritten_sites(student):
        site = student.get_submodule(path)
        sla = [m for m in site.modules() if isinstance(m, SparseLinearAttention)]
        if len(sla) != 1:
            raise RuntimeError(f"distill: site {path!r} holds {len(sla)} SparseLinearAttention modules, expected 1")
        out[path] = sla[0]
    return out


class ProjectionDrift:
    """Per-site Frobenius norm of ``proj_l.weight`` and its relative change between two records:
    ``||W_t - W_prev|| / max(||W_t||, DRIFT_EPS)``. Holds a float32 copy of every projection (the
    previous record's); sharded (FSDP2) weights are gathered, so every process must call
    :meth:`record` at the same steps."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.previous = self._weights()

    def _weights(self) -> list[Tensor]:
        weights = []
        for module in self.modules.values():
            w = module.proj_l.weight.detach()
            if hasattr(w, "full_tensor"):
                w = w.full_tensor()
            weights.append(w.float().clone())
        return weights

    def record(self) -> dict[str, dict[str, float]]:
        """``{"proj_l_norm": {site: norm}, "proj_l_drift": {site: relative change}}``; the
        current weights become the previous ones."""
        if not self.modules:
            return {"proj_l_norm": {}, "proj_l_drift": {}}
        current = self._weights()
        norms = torch.stack([torch.linalg.vector_norm(w) for w in current])
        changes = torch.stack([torch.linalg.vector_norm(w - prev) for w, prev in zip(current, self.previous)])
        self.previous = current
        # one device-to-host copy for every site
        norm_list, drift_list = torch.stack([norms, changes / norms.clamp_min(DRIFT_EPS)]).tolist()
        sites = list(self.modules)
        return {"proj_l_norm": dict(zip(sites, norm_list)), "proj_l_drift": dict(zip(sites, drift_list))}


# --- data ----------------------------------------------------------------------------------------

class StepSampler(Sampler[int]):
    """Dataset indices in step order: step ``s`` of rank ``r`` takes items
    ``((s * world + r) * batch + i) mod len`` — so a resumed run sees exactly the batches the
    uninterrupted run would have."""

    def __init__(self, length: int, start_step: int, end_step: int, batch: int, rank: int = 0, world: int = 1):
        self.length, self.start, self.end, self.batch, self.rank, self.world = length, start_step, end_step, batch, rank, world

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.end):
            base = (step * self.world + self.rank) * self.batch
            for i in range(self.batch):
                yield (base + i) % self.length

    def __len__(self) -> int:
        return (self.end - self.start) * self.batch


def collate(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return out


def _batches(data: Any, config: DistillConfig, start: int, end: int, rank: int, world: int) -> Iterator[Any]:
    if isinstance(data, (str, Path)):
        from lite3r_compile.distill.data import MultiViewFolder

        data = MultiViewFolder(data, config.num_views, seed=config.seed)
    if isinstance(data, (Tensor, Mapping)):
        # one batch, used at every step
        for _ in range(start, end):
            yield data
        return
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        sampler = StepSampler(len(data), start, end, config.batch_size, rank, world)
        loader = DataLoader(
            data, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
            collate_fn=collate, persistent_workers=False,
        )
        yield from loader
        return
    if isinstance(data, Iterable):
        # A plain iterable of batches: cycled. It cannot be rewound to a step, so a resumed run
        # skips the batches that the earlier run consumed.
        def cycle() -> Iterator[Any]:
            while True:
                empty = True
                for batch in data:
                    empty = False
                    yield batch
                if empty:
                    raise ValueError("distill: the data iterable yielded no batch")

        it = cycle()
        for _ in range(start * world + rank):
            next(it)
        for _ in range(start, end):
            yield next(it)
            for _ in range(world - 1):
                next(it)
        return
    raise TypeError(f"distill: data must be a tensor, a dict, a Dataset, an iterable of batches or a folder path, got {type(data).__name__}")


def _images(batch: Any) -> Tensor:
    images = batch["images"] if isinstance(batch, Mapping) else batch
    if not isinstance(images, Tensor) or images.dim() != 5 or images.shape[2] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"distill: a batch's images must be a (B, S, 3, H, W) tensor in [0, 1], got {shape}")
    return images


# --- training ------------------------------------------------------------------------------------

def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@contextmanager
def _activation_checkpointing(student: nn.Module, block_paths: Iterable[str]):
    """Recompute each block's forward in the backward pass instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    for path in block_paths:
        block = student.get_submodule(path)
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward


@contextmanager
def _stop_on_signals(flag: dict[str, bool]):
    """SIGINT / SIGTERM ask the loop to checkpoint and stop after the current step."""

    def handler(signum, _frame):
        flag["stop"] = True

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def prepare_trainable(student: nn.Module, teacher: nn.Module, trainable: str, autocast: bool) -> list[nn.Parameter]:
    """Make the parameters of ``student`` that ``trainable`` names trainable, each in storage of
    its own, and return them (tied parameters once).

    ``"all"`` switches ``requires_grad`` on for every floating-point parameter. A trainable
    parameter that shares storage with one of ``teacher``'s gets a copy (training must not move
    the teacher); with ``autocast`` a bf16/fp16 one becomes float32 (the master weight; autocast
    casts it down for the matmuls). The Parameter objects stay the same, so the student's
    modules, tied weights and state-dict keys are unchanged.
    """
    if trainable == "all":
        for p in student.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters() if p.device.type != "meta"}
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        master = autocast and p.dtype in (torch.float16, torch.bfloat16)
        if master or p.untyped_storage().data_ptr() in teacher_storage:
            p.data = p.detach().to(torch.float32 if master else p.dtype, copy=True)
    return params


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` on this process (local shards of DTensors)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def _freeze_running_stats(model: nn.Module) -> None:
    # Batch-norm statistics are buffers shared with the teacher: training mode must not update them.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: Any,
    *,
    steps: int,
    config: DistillConfig | None = None,
    output_loss_config: OutputLossConfig = OutputLossConfig(),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    log_file: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    **options: Any,
) -> DistillResult:
    """Train ``student`` to match ``teacher`` for ``steps`` optimizer steps (in total, counting
    the steps of a resumed checkpoint).

    ``data``: a (B, S, 3, H, W) tensor or a dict with ``images`` (one batch, used every step), a
    ``Dataset`` of scenes (batched in a reproducible step order), any iterable of batches, or the
    path of a folder of scene folders. ``options`` are :class:`DistillConfig` fields
    (``distill(..., steps=100, lr=3e-4)``; ``trainable="all"`` for full fine-tuning).
    ``on_step(step, loss)`` is called after every step; when it returns True the run stops there,
    as on SIGTERM (checkpointed, ``result.interrupted``). After the run the gradients are freed.
    Returns a :class:`DistillResult`; ``result.losses`` holds the total loss of every step run here.
    """
    config = dataclasses.replace(config or DistillConfig(), **options)
    if steps < 1:
        raise ValueError(f"distill: steps must be >= 1, got {steps}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainable = prepare_trainable(student, teacher, config.trainable, config.autocast)
    if not trainable:
        raise ValueError(
            "distill: the student has no trainable parameter (did it come from lite3r_compile.lite? "
            "Did lite() rewrite any attention site? trainable='all' fine-tunes the whole student)"
        )

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = trainable[0].device
    site_paths = select_attention_sites(student, config.attention_sites) if config.attention_weight > 0 else []

    student.train()
    _freeze_running_stats(student)
    config_dict = dataclasses.asdict(config)
    # before wrapping: FSDP2 changes the student's class (VGGT -> FSDPVGGT)
    fingerprint = ckpt.fingerprint(student, config_dict)
    model = _wrap_distributed(student, config) if distributed else student
    # FSDP2 replaces each parameter by a DTensor shard: the optimizer must hold those
    trainable = [p for p in student.parameters() if p.requires_grad]

    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, steps, config.warmup_steps, config.min_lr_ratio)
    )
    result = DistillResult(
        attention_sites=site_paths,
        trainable_params=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
    )
    start = 0
    torch.manual_seed(config.seed + rank)
    if resume:
        if checkpoint_dir is None:
            raise ValueError("distill: resume=True needs checkpoint_dir")
        state = ckpt.load(checkpoint_dir)
        diffs = ckpt.fingerprint_differences(state["fingerprint"], fingerprint)
        if diffs:
            raise ValueError("distill: the checkpoint belongs to another model or config:\n  " + "\n  ".join(diffs))
        ckpt.load_trainable(student, state["trainable"])
        _load_optimizer_state(student, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        # a run resumed on another number of processes reuses rank 0's generators where it must
        ckpt.set_rng_state(rng[rank if rank < len(rng) else 0] if isinstance(rng, list) else rng)
        start = state["step"]
        result.losses = list(state["losses"])
        result.output_losses = list(state["output_losses"])
        result.attention_losses = list(state["attention_losses"])
    if start >= steps:
        result.step = start
        return result

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if config.autocast else nullcontext()
    )
    block_paths = sorted({p.rsplit(".", 1)[0] for p, _ in rewritten_sites(student) if "." in p})
    log = open(log_file, "a") if log_file and rank == 0 else None
    drift = ProjectionDrift(site_projections(student)) if log_file else None
    bar = _progress_bar(steps, start, enabled=progress and rank == 0)
    stop = {"stop": False}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step = start

    def save() -> None:
        # Every process takes part (gathers of sharded parameters and of RNG states); rank 0 writes.
        if checkpoint_dir is None:
            return
        trainable_state = ckpt.gather_trainable(student)
        optim_state = _optimizer_state(student, optimizer)
        rng = ckpt.rng_state()
        if distributed:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        path = Path(checkpoint_dir) / ckpt.CHECKPOINT_NAME
        if rank == 0:
            ckpt.save_atomic(
                {
                    "trainable": trainable_state,
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "rng": rng,
                    "losses": result.losses,
                    "output_losses": result.output_losses,
                    "attention_losses": result.attention_losses,
                    "fingerprint": fingerprint,
                },
                path,
            )
        if distributed:
            dist.barrier()
        result.checkpoint = path

    with ExitStack() as stack:
        stack.enter_context(_stop_on_signals(stop))
        if config.activation_checkpointing:
            stack.enter_context(_activation_checkpointing(student, block_paths))
        for batch in _batches(data, config, start, steps, rank, world):
            images = _images(batch).to(device, non_blocking=True)
            with torch.no_grad(), autocast, capture_outputs(teacher, site_paths) as teacher_acts:
                teacher_out = teacher(images)
            with autocast, capture_outputs(student, site_paths) as student_acts:
                student_out = model(images)
            l_out, _ = output_loss(student_out, teacher_out, output_loss_config)
            l_att = attention_loss(student_acts, teacher_acts) if site_paths else l_out.new_zeros(())
            loss = config.output_weight * l_out + config.attention_weight * l_att
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distill: the loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            result.losses.append(loss.item())
            result.output_losses.append(l_out.item())
            result.attention_losses.append(l_att.item())
            elapsed = time.perf_counter() - t0
            if drift is not None and step % config.log_every == 0:
                projections = drift.record()  # on every process: sharded weights are gathered
                if log is not None:
                    record = {
                        "step": step, "loss": result.losses[-1], "output_loss": result.output_losses[-1],
                        "attention_loss": result.attention_losses[-1], "lr": scheduler.get_last_lr()[0],
                        "scenes_per_s": (step - start) * config.batch_size * world / elapsed,
                        **projections,
                    }
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", att=f"{result.attention_losses[-1]:.4f}")
            if on_step is not None and on_step(step, result.losses[-1]):
                stop["stop"] = True
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save()
            if _any_rank(stop["stop"], distributed):
                result.interrupted = True
                break
    bar.close()
    if log is not None:
        log.close()
    result.step = step
    result.seconds = time.perf_counter() - t0
    result.seconds_per_step = result.seconds / max(1, step - start)
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    # gradients are of no use after the last step; under full fine-tuning they are a model's worth
    optimizer.zero_grad(set_to_none=True)
    save()
    return result


def _parameter_names(student: nn.Module) -> dict[nn.Parameter, str]:
    return {p: name for name, p in student.named_parameters()}


def _optimizer_state(student: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state as a checkpoint holds it: ``{"state": {name: {...}}, "param_groups":
    [{..., "params": [name, ...]}]}`` with full (unsharded) CPU tensors keyed by parameter name,
    whatever the process count and strategy (one process, DDP replicas, FSDP2 shards), so a run
    resumes on any number of processes and under either strategy. Under FSDP2 every process must
    call it (shards are gathered).

    Written here rather than with ``torch.distributed.checkpoint.state_dict``: its full-state
    loader fails on an optimizer that has not stepped yet ("Expected device to be set", torch
    2.13), which is exactly the optimizer of a run being resumed.
    """
    names = _parameter_names(student)

    def full(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        return value.detach().to("cpu", copy=True)

    state, groups = {}, []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                state[names[p]] = {k: full(v) for k, v in optimizer.state[p].items()}
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[p] for p in group["params"]]})
    return {"state": state, "param_groups": groups}


def _load_optimizer_state(student: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load :func:`_optimizer_state`'s form into ``optimizer``: each process reads the full state
    and keeps its shard of each tensor shaped like its parameter. Parameters that never received
    a gradient (a head the batches do not run) have no state."""
    names = _parameter_names(student)
    if any(isinstance(key, int) for key in saved.get("state", {})):
        raise ValueError(
            "distill: this checkpoint's optimizer state is keyed by parameter index (written by an "
            "earlier lite3r_compile); resume it with the version that wrote it, or start afresh"
        )

    def local(value: Any, p: nn.Parameter) -> Any:
        if isinstance(value, Tensor) and hasattr(p, "device_mesh") and value.shape == p.shape:
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    state, groups, index = {}, [], 0
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group_names = [names[p] for p in group["params"]]
        if group_names != saved_group["params"]:
            raise ValueError(f"distill: the checkpoint's optimizer holds other parameters: "
                             f"{saved_group['params'][:3]}... against {group_names[:3]}...")
        for p, name in zip(group["params"], group_names):
            if name in saved["state"]:
                state[index] = {k: local(v, p) for k, v in saved["state"][name].items()}
            index += 1
        groups.append({**saved_group, "params": list(range(index - len(group_names), index))})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _any_rank(flag: bool, distributed: bool) -> bool:
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _wrap_distributed(student: nn.Module, config: DistillConfig) -> nn.Module:
    """DistributedDataParallel over the trainable parameters, or FSDP2 shards of each block."""
    if config.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for path, _ in rewritten_sites(student):
            parent = path.rsplit(".", 1)[0] if "." in path else path
            fully_shard(student.get_submodule(parent))
        fully_shard(student)
        return student
    from torch.nn.parallel import DistributedDataParallel

    device = next(p for p in student.parameters() if p.requires_grad).device
    # static_graph: the parameters that get gradients are the same at every step, and some never
    # do (the SLA projections of a head the training batches do not run, e.g. VGGT's track head)
    return DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        static_graph=True,
    )


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="distill", unit="step", dynamic_ncols=True)
