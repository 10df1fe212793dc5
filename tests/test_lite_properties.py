"""lite() over random 3D-transformer architectures (hypothesis): the student is exact at topk=1
without FP8, trains only its SLA projections, shares the teacher's storage, leaves the teacher
unchanged, and keeps the teacher's state dict."""

from __future__ import annotations

import warnings

import torch
from hypothesis import given, settings

from lite3r_compile import FP8Config, LiteConfig, SLAConfig, lite
from lite3r_compile.testing import architectures, flatten_outputs, relative_error

EXACT = LiteConfig(sla=SLAConfig(topk=1.0, block_q=16, block_k=16), fp8=FP8Config(enabled=False))


def _run(model, inputs):
    return model(*inputs) if isinstance(inputs, tuple) else model(**inputs)


@settings(max_examples=8)
@given(architectures(max_blocks=2, max_decoder_blocks=1))
def test_lite_student_properties(generated):
    teacher = generated.model.eval()
    inputs = generated.example_inputs
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        dense = _run(teacher, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = lite(teacher, backend="eager", config=EXACT, example_inputs=inputs)
    student.eval()

    # exact SLA without FP8 is the teacher
    with torch.no_grad():
        assert relative_error(_run(student, inputs), dense) < 1e-5, generated.description

    # only the projections of rewritten sites are trainable, and only they get gradients
    rewritten = {t.path for t in generated.sites if not t.has_mask}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert all(".proj_l." in n for n in trainable)
    assert {n.split(".sla")[0] for n in trainable} == rewritten, generated.description
    if trainable:  # (a model whose every site is masked stays dense and has nothing to train)
        student.train()
        outputs = [t for t in flatten_outputs(_run(student, inputs)) if t.is_floating_point()]
        sum(t.float().square().mean() for t in outputs).backward()
        for name, p in student.named_parameters():
            assert (p.grad is not None) == (name in trainable), name
        assert all(p.grad is None for p in teacher.parameters())

    # frozen parameters share the teacher's storage; the teacher is unchanged
    teacher_params = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        if name not in trainable:
            assert p.data_ptr() == teacher_params[name].data_ptr() and p is not teacher_params[name], name
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())

    # the teacher's state dict loads into the student; the student's round-trips
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert set(missing) == trainable and unexpected == []
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(saved)
    assert all(torch.equal(v, saved[k]) for k, v in student.state_dict().items())
