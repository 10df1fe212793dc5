"""Graph passes of lite3r-compile, one per file (find attention, SLA rewrite, FP8 QAT, freeze)."""
