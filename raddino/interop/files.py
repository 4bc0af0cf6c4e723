"""Weight files read and written without executing code.

Reading accepts safetensors (a JSON header plus raw tensor bytes: nothing to execute) and PyTorch files through
``torch.load(weights_only=True)``, whose restricted unpickler only rebuilds tensors and plain containers and refuses
any other Python object -- a pickle whose unpickling would call code is rejected before anything runs. Nested
containers (``{"teacher": {"backbone.x": ...}}``, ``{"model": ..., "optimizer": ...}``) are flattened into dotted
names; only tensors are kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from raddino.errors import RaddinoError
from raddino.io import atomic_path

SAFETENSORS_SUFFIX = ".safetensors"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def flatten_tensors(payload: object, prefix: str = "") -> dict[str, Tensor]:
    """Tensors of a (nested) mapping under dotted names; everything else (numbers, strings, lists) is dropped."""
    out: dict[str, Tensor] = {}
    if isinstance(payload, Tensor):
        out[prefix.rstrip(".")] = payload
    elif isinstance(payload, Mapping):
        for key, value in payload.items():
            out.update(flatten_tensors(value, f"{prefix}{key}."))
    return out


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors header (``{}`` when there is none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types for bad headers)
        raise RaddinoError(f"{path}: not a valid safetensors file ({_first_line(err)})") from None


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a weights file, on the CPU, under flattened dotted names.

    Raises:
        RaddinoError: missing file, truncated or malformed file, or a pickle that holds anything besides tensors
            and plain containers (nothing in it is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise RaddinoError(f"weights file not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001  (SafetensorError / OSError for truncated or garbled files)
            raise RaddinoError(f"{path}: not a valid safetensors file ({_first_line(err)})") from None
        return dict(tensors)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (UnpicklingError, zip errors, EOF of a truncated file)
        message = _first_line(err)
        if "weights only load failed" in str(err).lower() or "unsupported global" in str(err).lower():
            raise RaddinoError(
                f"{path}: refused to load: the file holds Python objects besides tensors, and raddino never "
                "unpickles arbitrary objects (save a plain state dict, or convert the file to .safetensors)"
            ) from None
        raise RaddinoError(f"{path}: cannot read as a PyTorch weights file ({message})") from None
    tensors = flatten_tensors(payload)
    if not tensors:
        raise RaddinoError(f"{path}: holds no tensors")
    return tensors


# Training scripts wrap the weights of a torch file in one of these entries (``{"state_dict": ...}``,
# ``{"model": ..., "optimizer": ...}``, a DINO ``{"teacher": ...}``); a state-dict reader unwraps them in this order.
WRAPPER_KEYS = ("state_dict", "model", "teacher")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A model's state dict from a weights file: :func:`read_tensors`, with a torch file's ``state_dict`` /
    ``model`` / ``teacher`` wrapper entries unwrapped (safetensors names are kept as they are)."""
    path = Path(path)
    tensors = read_tensors(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return tensors
    for key in WRAPPER_KEYS:
        prefix = f"{key}."
        if any(name.startswith(prefix) for name in tensors):
            tensors = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
    return tensors


def read_sharded_safetensors(index_file: Path) -> dict[str, Tensor]:
    """Tensors of a sharded checkpoint (``model.safetensors.index.json`` with a ``weight_map``)."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RaddinoError(f"{index_file}: not a safetensors index ({_first_line(err)})") from None
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = (index_file.parent / shard).resolve()
        if shard_path.parent != index_file.parent.resolve():  # names in the index must stay inside the directory
            raise RaddinoError(f"{index_file}: shard {shard!r} lies outside its directory")
        tensors.update(read_tensors(shard_path))
    return tensors


def write_safetensors(path: Path, tensors: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous, on the CPU) atomically: a temporary file renamed into place."""
    from safetensors.torch import save_file

    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        tmp.open("wb").close()  # created by Python (mode from the umask); safetensors keeps an existing file's mode
        save_file(plain, str(tmp), metadata=dict(metadata or {}))


def write_torch(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """A plain ``{name: tensor}`` dict with ``torch.save`` (loadable with ``torch.load(weights_only=True)``)."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        torch.save(plain, tmp)
