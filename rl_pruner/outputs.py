"""Output files: checking an ``--out`` path before any work starts, and writing files atomically.

This module imports nothing heavy, so the CLI checks its outputs before it loads torch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from rl_pruner.errors import InputError


def check_output_path(path: str | Path, force: bool, flag: str = "--out") -> Path:
    """Return ``path`` as a Path, or raise InputError if a file cannot be written there.

    Rejected: an existing file without ``force``, a directory, and a path below an
    existing file. Missing parent directories are accepted because the writer creates them.
    """
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{flag} {out} is a directory; pass a file path")
    if out.exists() and not force:
        raise InputError(f"{flag} {out} already exists; pass --force to overwrite it or choose another path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{flag} {out}: {parent} is a file, not a directory; choose a path in a directory")
            break
    return out


def input_files(args: argparse.Namespace) -> dict[str, Path]:
    """Return the local files that a command's options name as inputs, by option.

    These are ``--checkpoint``, ``--teacher``, a ``--policy`` file (not a ``runs:/``
    artifact) and the file of a ``pruned:`` ``--model``, where the command has them.
    """
    files = {f"--{name}": Path(getattr(args, name)) for name in ("checkpoint", "teacher") if getattr(args, name, None)}
    policy = getattr(args, "policy", None)
    if policy and not policy.startswith("runs:/"):
        files["--policy"] = Path(policy)
    model = str(getattr(args, "model", ""))
    if model.startswith("pruned:"):
        files["--model"] = Path(model.removeprefix("pruned:"))
    return files


def check_distinct_files(files: Mapping[str, Path]) -> None:
    """Raise InputError when two of ``files`` (by option name) are the same file, so no output replaces an input."""
    seen: dict[Path, str] = {}
    for flag, path in files.items():
        resolved = path.resolve()
        if resolved in seen:
            raise InputError(f"{flag} {path} is also the {seen[resolved]} file; pass another path to {flag}")
        seen[resolved] = flag


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then move it into place.

    A crash or an error in ``write`` leaves any existing ``path`` unchanged. Missing
    parent directories are created, and the file gets the permissions of a new file
    under the current umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates files readable by the owner only
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
