"""Subcommands of the ``lite3r`` CLI, one module each (see :mod:`lite3r_compile.cli`)."""
