"""Reading checkpoints safely and loading them into a model.

Checkpoints are read with ``torch.load(..., weights_only=True)``, which refuses to
run code stored in the file. A fully pickled model (``torch.save(model)``) needs
``trust_pickle=True``, the CLI's ``--trust-pickle``, and should only be used on files
from a trusted source.

Accepted layouts: a plain state_dict; a dict holding one under ``state_dict``,
``model_state_dict``, ``model``, ``net`` or ``weights``; a pickled ``nn.Module`` (trusted
only). Keys saved from ``nn.DataParallel`` or DDP (``module.`` prefix) are accepted, and
tensors saved on a GPU are mapped to the CPU.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rl_pruner.errors import CheckpointError

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# torch.save writes a zip archive since PyTorch 1.6, and a pickle of protocol 2 or
# higher (first byte 0x80) in the legacy format.
ZIP_HEADER = b"PK\x03\x04"
PICKLE_PROTOCOL_2_HEADER = b"\x80"


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> object:
    """Read a checkpoint file onto the CPU; raise CheckpointError if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass an existing file to --checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    # A file that is not a checkpoint at all fails inside the unpickler with KeyError or
    # IndexError as well, for example a text file read as a legacy checkpoint.
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            KeyError, IndexError) as err:
        raise _read_error(path, err, trust_pickle) from err


def _read_error(path: Path, err: Exception, trust_pickle: bool) -> CheckpointError:
    """Explain why ``torch.load`` failed on ``path``, with what to do about it."""
    try:
        with path.open("rb") as file:
            header = file.read(len(ZIP_HEADER))
    except OSError:
        header = b""
    if header and not header.startswith((ZIP_HEADER, PICKLE_PROTOCOL_2_HEADER)):
        return CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint (it starts like neither a zip archive nor a pickle); "
            "pass a file written by torch.save"
        )
    if isinstance(err, pickle.UnpicklingError):
        if not trust_pickle:
            return CheckpointError(
                f"checkpoint {path} contains pickled Python objects, not only tensors; "
                "save its state_dict instead, or pass --trust-pickle if you trust the file's source"
            )
        return CheckpointError(f"checkpoint {path} could not be unpickled ({_first_line(err)}); re-save it")
    return CheckpointError(
        f"checkpoint {path} is corrupt or truncated ({_first_line(err)}); re-save or re-download it"
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def extract_state_dict(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """Find the state_dict inside a loaded checkpoint and strip ``module.`` prefixes."""
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    elif isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj:
                return extract_state_dict(obj[key], path)
        raise CheckpointError(
            f"checkpoint {path} has no state_dict (top-level keys: {sorted(map(str, obj))[:8]}); "
            f"save a state_dict or a dict holding one under one of {list(STATE_DICT_KEYS)}"
        )
    else:
        raise CheckpointError(
            f"checkpoint {path} contains a {type(obj).__name__}, not a state_dict; save model.state_dict()"
        )
    return {_strip_wrapper_prefix(k): v for k, v in state.items()}


def _strip_wrapper_prefix(key: str) -> str:
    return key.removeprefix("module.")


def load_weights(model: nn.Module, path: str | Path, *, model_name: str, trust_pickle: bool = False) -> None:
    """Load a checkpoint into ``model`` key for key; raise CheckpointError on any mismatch."""
    state = extract_state_dict(read_checkpoint(path, trust_pickle=trust_pickle), path)
    expected = model.state_dict()
    # Checkpoints from PyTorch before 0.4.1 have no batch-norm step counters; they are
    # only used when momentum is None, so the model's own zeros are kept.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[0]})")
        raise CheckpointError(
            f"checkpoint {path} does not fit model {model_name}: {', '.join(details)}; "
            "pass the --model the checkpoint was trained as"
        )
    model.load_state_dict(state, strict=True)
