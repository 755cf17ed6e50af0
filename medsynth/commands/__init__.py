"""Subcommands of the ``medsynth`` CLI: one module each, with ``register(subparsers)``."""
