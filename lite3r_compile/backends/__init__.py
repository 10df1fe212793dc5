"""Deployment backends of lite students: real FP8 Linear layers, Inductor/Triton lowering and the
``lite3r`` torch.compile backend."""
