"""Subcommands of the `peftc` CLI, one module each."""
