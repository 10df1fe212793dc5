"""Distillation of a lite student against its dense teacher: data, losses, metrics, trainer."""
