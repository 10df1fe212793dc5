"""The distillation trainer on the zoo's tiny VGGT with synthetic scenes (CPU)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from lite3r_compile import LiteConfig, SLAConfig, lite
from lite3r_compile.distill import checkpoint as ckpt
from lite3r_compile.distill.losses import attention_loss, capture_outputs, output_loss
from lite3r_compile.distill.synthetic import SyntheticScenes, SyntheticSceneConfig
from lite3r_compile.distill.trainer import (
    DistillConfig,
    distill,
    select_attention_sites,
    site_projections,
    warmup_cosine,
)
from lite3r_compile.models_zoo import create

SCENES = SyntheticScenes(16, SyntheticSceneConfig(num_views=2, height=28, width=28, num_objects=3))
CONFIG = DistillConfig(lr=5e-3, warmup_steps=3, num_views=2, autocast=False)


def _build_pair():
    torch.manual_seed(0)
    teacher = create("vggt-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend="eager", config=LiteConfig(sla=SLAConfig(topk=0.25, block_q=16, block_k=16)))
    return teacher, student


@pytest.fixture(scope="module")
def built_pair():
    """One teacher and its student for the module: capture is the slow part of lite()."""
    return _build_pair()


@pytest.fixture
def pair(built_pair):
    """The module's pair with the projections back at their zero initialisation, as lite() makes
    them (only they change in training), and a fresh random state."""
    teacher, student = built_pair
    _reset(student)
    return teacher, student


def _reset(student):
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.zero_()
    torch.manual_seed(0)


class SyntheticSubset(torch.utils.data.Dataset):
    def __init__(self, scenes, n):
        self.scenes, self.n = scenes, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.scenes[i]


def _held_out_losses(teacher, student, batches):
    """The trainer's loss terms on fixed batches, without training (student in training mode:
    its fake-quant form, as the trainer runs it)."""
    sites = select_attention_sites(student, CONFIG.attention_sites)
    student.train()
    att, out = [], []
    with torch.no_grad():
        for images in batches:
            with capture_outputs(teacher, sites) as t_acts:
                t_out = teacher.eval()(images)
            with capture_outputs(student, sites) as s_acts:
                s_out = student(images)
            att.append(attention_loss(s_acts, t_acts).item())
            out.append(output_loss(s_out, t_out)[0].item())
    att, out = sum(att) / len(att), sum(out) / len(out)
    return {"attention": att, "output": out, "total": att + out}


def _trainable(student):
    return {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}


def test_distill_trains_only_the_projections_and_the_losses_fall(pair):
    teacher, student = pair
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert frozen_before and all(n.endswith(("proj_l.weight", "proj_l.bias")) for n in _trainable(student))
    held_out = [SCENES[i]["images"][None] for i in range(12, 16)]  # scenes 0-11 feed the 30 steps
    before = _held_out_losses(teacher, student, held_out)
    result = distill(teacher, student, SyntheticSubset(SCENES, 12), steps=30, config=CONFIG, progress=False)
    assert len(result.losses) == 30 and result.step == 30
    assert result.attention_sites, "the default selects the global-attention sites"
    assert all(".global_blocks." in p for p in result.attention_sites)
    # attention distillation has something to learn at init (topk < 1) and learns it; judged on
    # scenes training never saw, since per-step losses vary with the scene drawn
    assert result.attention_losses[0] > 1e-4
    after = _held_out_losses(teacher, student, held_out)
    assert after["attention"] < before["attention"], (before, after)
    assert after["total"] < before["total"], (before, after)
    # nothing but the projections moved, in the student or in the teacher that shares its storage
    for n, p in student.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert any(p.abs().sum() > 0 for p in _trainable(student).values())


def test_resume_after_a_crash_gives_the_uninterrupted_losses(tmp_path, pair):
    teacher, student = pair
    full = distill(teacher, student, SCENES, steps=30, config=CONFIG, progress=False)

    class Crash(Exception):
        pass

    def crash_at_12(step, _loss):
        if step == 12:
            raise Crash

    _reset(student)  # a new process would start from lite()'s zero projections
    with pytest.raises(Crash):
        distill(teacher, student, SCENES, steps=30, config=CONFIG, checkpoint_every=10,
                checkpoint_dir=tmp_path, on_step=crash_at_12, progress=False)
    assert ckpt.load(tmp_path)["step"] == 10
    assert not [p for p in tmp_path.iterdir() if p.name != ckpt.CHECKPOINT_NAME], "temporary files left behind"

    _reset(student)  # a new process would start from lite()'s zero projections
    resumed = distill(teacher, student, SCENES, steps=30, config=CONFIG, checkpoint_every=10,
                      checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.step == 30
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    assert _trainable(student).keys() == ckpt.load(tmp_path)["trainable"].keys()


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_atomic({"step": 1}, tmp_path / "c.pt")

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"step": 2}, tmp_path / "c.pt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "c.pt", weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_resume_refuses_another_config_and_lists_the_differences(tmp_path, pair):
    teacher, student = pair
    distill(teacher, student, SCENES, steps=2, config=CONFIG, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"config lr: 0.005 in the checkpoint, 0.001 now"):
        distill(teacher, student, SCENES, steps=4, config=CONFIG, lr=1e-3, checkpoint_dir=tmp_path, resume=True, progress=False)
    torch.manual_seed(0)
    other = create("vggt-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other_student = lite(other, backend="eager", config=LiteConfig(sla=SLAConfig(topk=0.25, block_q=16, block_k=16), sla_scopes=("global",)))
    with pytest.raises(ValueError, match="trainable parameter .*frame_blocks.*in the checkpoint, not in this model"):
        distill(other, other_student, SCENES, steps=4, config=CONFIG, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_attention_site_selection(pair):
    _, student = pair
    frame = select_attention_sites(student, ("frame",))
    # per-frame attention: the aggregator's frame blocks and the DINOv2 patch-embed blocks
    assert {f"aggregator.frame_blocks.{i}.attn" for i in range(4)} <= set(frame)
    assert not any(".global_blocks." in p for p in frame)
    assert select_attention_sites(student, ("#0",)) == [select_attention_sites(student, ("all",))[0]]
    assert select_attention_sites(student, ("aggregator.global_blocks.1.*",)) == ["aggregator.global_blocks.1.attn"]
    with pytest.raises(ValueError, match="match none"):
        select_attention_sites(student, ("nothing.*",))


def test_schedule_warms_up_then_decays():
    lrs = [warmup_cosine(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] >= 0.1


def _cli(*args, env=None):
    return [sys.executable, "-m", "lite3r_compile.cli", "distill", "--model", "vggt-tiny", "--scenes", "8",
            "--views", "2", "--image-size", "28", "28", "--no-progress", "--no-autocast", *args]


def test_cli_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    # 12 steps keep this CLI round trip cheap; the 30-step kill-at-10 case runs through the API above
    common = ["--steps", "12", "--lr", "5e-3", "--warmup-steps", "3", "--checkpoint-every", "2"]
    subprocess.run(_cli(*common, "--log", str(tmp_path / "full.jsonl")), check=True, capture_output=True)
    log = tmp_path / "part.jsonl"
    proc = subprocess.Popen(_cli(*common, "--log", str(log), "--checkpoint-dir", str(tmp_path / "ck")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    stopped_at = ckpt.load(tmp_path / "ck")["step"]
    assert 4 <= stopped_at < 12
    done = subprocess.run(_cli(*common, "--log", str(log), "--checkpoint-dir", str(tmp_path / "ck"), "--resume"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    full = [json.loads(line)["loss"] for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    part = [json.loads(line) for line in log.read_text().splitlines()]
    resumed = {r["step"]: r["loss"] for r in part}
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(1, 13)] == pytest.approx(full, rel=1e-5, abs=1e-7)


TORCHRUN_SCRIPT = """
import sys, torch, torch.distributed as dist, warnings
from lite3r_compile import lite, LiteConfig, SLAConfig
from lite3r_compile.models_zoo import create
from lite3r_compile.distill.losses import attention_loss, capture_outputs, output_loss
from lite3r_compile.distill.synthetic import SyntheticScenes, SyntheticSceneConfig
from lite3r_compile.distill.trainer import DistillConfig, distill
dist.init_process_group("gloo")
torch.manual_seed(0)
teacher = create("vggt-tiny")
warnings.simplefilter("ignore")
student = lite(teacher, backend="eager", config=LiteConfig(sla=SLAConfig(topk=0.25, block_q=16, block_k=16)))
scenes = SyntheticScenes(8, SyntheticSceneConfig(num_views=2, height=28, width=28, num_objects=3))
result = distill(teacher, student, scenes, steps=6, config=DistillConfig(lr=5e-3, num_views=2, autocast=False),
                 checkpoint_dir=sys.argv[1], progress=False)
torch.save({n: p.detach() for n, p in student.named_parameters() if p.requires_grad}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
torch.save(result.losses, f"{sys.argv[1]}/losses{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_processes_with_gloo_end_with_identical_projections(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(v.abs().sum() > 0 for v in r0.values())
    # the ranks saw different scenes
    assert torch.load(tmp_path / "losses0.pt") != torch.load(tmp_path / "losses1.pt")
    assert ckpt.load(tmp_path)["step"] == 6


ELASTIC_SCRIPT = """
import os, sys, torch, torch.distributed as dist, warnings
from lite3r_compile import lite, LiteConfig, SLAConfig
from lite3r_compile.models_zoo import create
from lite3r_compile.distill import checkpoint as ckpt
from lite3r_compile.distill.synthetic import SyntheticScenes, SyntheticSceneConfig
from lite3r_compile.distill.trainer import DistillConfig, distill
out, strategy, steps, resume, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume", sys.argv[5]
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank = dist.get_rank() if distributed else 0
torch.manual_seed(0)
teacher = create("vggt-tiny")
warnings.simplefilter("ignore")
student = lite(teacher, backend="eager", config=LiteConfig(sla=SLAConfig(topk=0.25, block_q=16, block_k=16)))
scenes = SyntheticScenes(8, SyntheticSceneConfig(num_views=2, height=28, width=28, num_objects=3))
config = DistillConfig(lr=5e-3, num_views=2, autocast=False, strategy=strategy, checkpoint_every=2)
result = distill(teacher, student, scenes, steps=steps, config=config, checkpoint_dir=out, resume=resume, progress=False)
projections = ckpt.gather_trainable(student)  # every process takes part (FSDP2 gathers shards)
torch.save({"projections": projections, "losses": result.losses, "step": result.step}, f"{out}/{tag}_rank{rank}.pt")
if distributed:
    dist.destroy_process_group()
"""


def _elastic_run(tmp_path, nproc, strategy, steps, resume, tag):
    script = tmp_path / "elastic.py"
    script.write_text(ELASTIC_SCRIPT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(script), str(tmp_path), strategy, str(steps),
                                                           "resume" if resume else "fresh", tag]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return [torch.load(tmp_path / f"{tag}_rank{r}.pt") for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_run_resumes_on_another_number_of_processes(tmp_path, strategy):
    # 2 processes train 4 steps; 1 process resumes to 6; 2 processes resume that to 8 under the
    # other strategy. The checkpoint holds full tensors keyed by parameter name, whatever wrote
    # them (FSDP2 shards or DDP replicas), so any number of processes can continue it.
    two = _elastic_run(tmp_path, 2, strategy, 4, False, "first")
    for r in two:
        assert r["step"] == 4 and len(r["losses"]) == 4
    p0, p1 = two[0]["projections"], two[1]["projections"]
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    assert any(v.abs().sum() > 0 for v in p0.values())

    (one,) = _elastic_run(tmp_path, 1, strategy, 6, True, "second")
    assert one["step"] == 6 and one["losses"][:4] == two[0]["losses"]
    assert any(not torch.equal(one["projections"][k], p0[k]) for k in p0), "the resumed run trained"

    again = _elastic_run(tmp_path, 2, {"fsdp": "ddp", "ddp": "fsdp"}[strategy], 8, True, "third")
    assert [r["step"] for r in again] == [8, 8] and again[0]["losses"][:6] == one["losses"]
    a0, a1 = again[0]["projections"], again[1]["projections"]
    assert all(torch.equal(a0[k], a1[k]) for k in a0)
    assert ckpt.load(tmp_path)["step"] == 8


def test_full_finetuning_trains_every_parameter_and_leaves_the_teacher_alone():
    # trainable="all" (the baseline the Lite3R recipe is measured against): every float
    # parameter of the student trains, in storage of its own, and the teacher does not move
    teacher, student = _build_pair()  # its own pair: every parameter of this student changes
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_ptrs = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    assert any(p.untyped_storage().data_ptr() in teacher_ptrs for p in student.parameters())
    sla_only = distill(teacher, copy.deepcopy(student), SCENES, steps=2, config=CONFIG, progress=False)

    result = distill(teacher, student, SCENES, steps=3, config=dataclasses.replace(CONFIG, trainable="all", lr=1e-3),
                     progress=False)
    params = list(student.parameters())
    assert all(p.requires_grad for p in params if p.is_floating_point())
    assert not any(p.untyped_storage().data_ptr() in teacher_ptrs for p in params)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, student_before[n])]
    assert any(".frame_blocks.0.attn.qkv.weight" in n for n in moved)
    assert any(".patch_embed." in n for n in moved) and any(n.startswith("depth_head.") for n in moved)
    assert result.trainable_params == sum(p.numel() for p in params)
    assert result.trainable_params > 100 * sla_only.trainable_params
    # AdamW: two float32 moments per element that got a gradient (VGGT's track head never runs
    # in training, so it has no state), plus a step counter per tensor
    moved_elements = sum(p.numel() for n, p in student.named_parameters() if n in moved)
    assert 8 * moved_elements <= result.optimizer_state_bytes <= 8 * result.trainable_params + 8 * len(params)
    assert 0 < sla_only.optimizer_state_bytes <= 8 * sla_only.trainable_params + 8 * len(params)
    assert result.optimizer_state_bytes > 100 * sla_only.optimizer_state_bytes
    assert all(p.grad is None for p in params), "gradients are freed after the run"
    with pytest.raises(ValueError, match="trainable must be 'sla'"):
        DistillConfig(trainable="everything")


def test_log_records_each_projection_norm_and_drift(tmp_path, pair):
    teacher, student = pair
    log = tmp_path / "metrics.jsonl"
    distill(teacher, student, SCENES, steps=3, config=CONFIG, log_file=log, progress=False)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    projections = site_projections(student)
    assert projections
    for r in records:
        assert set(r["proj_l_norm"]) == set(r["proj_l_drift"]) == set(projections)
    # the first record compares with lite()'s zero initialisation: a relative change of 1 for
    # every projection that moved
    first = records[0]
    assert all(first["proj_l_drift"][s] == pytest.approx(1.0) for s, n in first["proj_l_norm"].items() if n > 0)
    last = records[-1]["proj_l_norm"]
    for site, module in projections.items():
        assert last[site] == pytest.approx(float(torch.linalg.vector_norm(module.proj_l.weight)), rel=1e-5)
    assert 0 < max(records[-1]["proj_l_drift"].values()) < 1


def test_on_step_returning_true_stops_the_run(tmp_path, pair):
    teacher, student = pair
    result = distill(teacher, student, SCENES, steps=10, config=CONFIG, progress=False,
                     on_step=lambda step, loss: step == 2, checkpoint_dir=tmp_path)
    assert result.step == 2 and result.interrupted and len(result.losses) == 2
    assert ckpt.load(tmp_path)["step"] == 2
