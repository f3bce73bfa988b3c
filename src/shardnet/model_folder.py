"""The first check of a model folder: it exists and has a config.json. No torch or transformers here, so
a command given a wrong ``--model`` says so at once; ``models.checkpoint.load_config`` reads the rest."""

from __future__ import annotations

from pathlib import Path

from shardnet.errors import ModelLoadError


def check_model_folder(path: str | Path) -> Path:
    """``path`` as a folder with a config.json; ModelLoadError naming what is missing otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {str(folder)!r} does not exist or is not a directory")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(folder)!r} has no config.json")
    return folder
