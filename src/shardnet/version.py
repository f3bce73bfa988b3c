"""The package version, in its own module so every layer can read it, and what ``shardnet --version``
reports: the versions of the libraries a swarm's behaviour depends on, read from the installed
distributions' metadata (nothing is imported)."""

from __future__ import annotations

import importlib.metadata
import platform

__version__ = "0.1.0"

# What decides how a shardnet process computes and talks, in the order --version prints them.
REPORTED = ("torch", "transformers", "hivemind", "grpcio", "protobuf")


def versions_report() -> str:
    """One ``name version`` line each: shardnet, python, then ``REPORTED`` ("not installed" if absent)."""
    lines = [f"shardnet {__version__}", f"python {platform.python_version()}"]
    for name in REPORTED:
        try:
            lines.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{name} not installed")
    return "\n".join(lines)
