"""Adapter files: safetensors tensors plus metadata, written atomically (a full disk leaves the old
file in place) with the umask's permissions; folders of files are staged and moved in as a unit.

Metadata keys: peftkit_version, method, config (JSON), base_model (id or path), base_fingerprint
(hash of target names and weight shapes), adapter_name. Loading checks the fingerprint before any
tensor is copied, so an adapter for another base fails with a message, not a shape error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .errors import PeftkitError
from .inject import AdapterHandle, candidate_modules, find_targets, fingerprint, inject


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` then rename over `path`, so a crash or a full disk never leaves a
    half-written file: the previous `path`, if any, stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; a saved file should read like any other tool's output.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        raise _write_error(path, err) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    # Linux reports it; elsewhere set-and-restore, which other threads may briefly see.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _write_error(path: Path, err: Exception) -> PeftkitError:
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or "No space left" in str(err):
        why = "the disk is full: free some space and save again"
    elif isinstance(err, OSError):
        why = f"{err.strerror or err}: check the folder's permissions and free space"
    else:
        why = f"{err}: check the folder's permissions and free space"
    return PeftkitError(f"could not write {str(path)!r} ({why}); any previous file there is kept")


@contextlib.contextmanager
def staged_folder(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Write a set of files as a unit: the body writes into the yielded staging folder (inside
    `output_dir`); only when it finishes are the files renamed into `output_dir`, so a failure
    (disk full, crash) never mixes new files with older ones. Renames need no free space.

        with staged_folder("out/dog") as stage:
            save_adapter(handle, stage / "unet_adapter.safetensors")
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=output_dir, prefix=".staging-"))
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise PeftkitError(f"file {str(path)!r} does not exist: check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PeftkitError(
            f"{str(path)!r} is not a readable safetensors file ({err}); it may be truncated or corrupt: "
            "save it again or re-download it"
        ) from None
    return tensors, metadata


def save_adapter(
    handle: AdapterHandle, path: str | os.PathLike, extra: dict[str, str] | None = None
) -> Path:
    """Write `handle`'s adapter to `path` (.safetensors) atomically."""
    from .. import __version__

    metadata = {
        "peftkit_version": __version__,
        "method": handle.config.method,
        "config": handle.config.to_json(),
        "base_model": handle.base_model or "",
        "base_fingerprint": handle.fingerprint(),
        "base_shapes": json.dumps(base_shapes(handle.model, list(handle.layers))),
        "adapter_name": handle.name,
        **(extra or {}),
    }
    return save_tensors(path, handle.state_dict(), metadata)


def read_adapter_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, str]]:
    _, metadata = read_tensors(path)
    return _config_of(metadata, path), metadata


def _config_of(metadata: dict[str, str], path) -> AdapterConfig:
    if "config" not in metadata:
        raise PeftkitError(
            f"{str(path)!r} has no peftkit metadata: it was not written by peftkit "
            "(for diffusers/kohya LoRA files use peftkit.diffusion.formats)"
        )
    return AdapterConfig.from_json(metadata["config"])


def load_adapter(
    model: nn.Module, path: str | os.PathLike, name: str | None = None, scale: float = 1.0
) -> AdapterHandle:
    """Inject the adapter stored at `path` into `model` and load its weights.

    Fails before touching the model when the adapter was made for a base with other target
    modules or shapes, naming the first module that differs.
    """
    tensors, metadata = read_tensors(path)
    config = _config_of(metadata, path)
    _refuse_non_finite(tensors, path)
    name = name or metadata.get("adapter_name") or "default"
    try:
        targets = find_targets(model, config)
    except PeftkitError:
        raise PeftkitError(
            f"adapter {str(path)!r} targets {config.targets} but this model has no such modules: "
            f"it was made for base {metadata.get('base_model') or 'unknown'!r}"
        ) from None
    expected = metadata.get("base_fingerprint")
    if expected and fingerprint(model, targets) != expected:
        _raise_first_mismatch(model, targets, path, metadata)
    handle = inject(
        model, config, name=name, base_model=metadata.get("base_model") or None, scale=scale
    )
    try:
        handle.load_state_dict(tensors)
    except PeftkitError:
        handle.unload()
        raise
    return handle


def _refuse_non_finite(tensors: dict[str, torch.Tensor], path) -> None:
    # A NaN adapter loads fine and renders black images; say so at load instead.
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise PeftkitError(
                f"adapter {str(path)!r} holds NaN or infinite values in tensor {key!r}: the training "
                "run diverged; use an earlier checkpoint or train again with a lower learning rate"
            )


def base_shapes(model: nn.Module, names: list[str]) -> dict[str, list[int]]:
    modules = dict(candidate_modules(model))
    return {n: list(modules[n].weight.shape) for n in sorted(names)}


def _raise_first_mismatch(
    model: nn.Module, targets: list[str], path, metadata: dict[str, str]
) -> None:
    try:
        stored = json.loads(metadata.get("base_shapes", "{}"))
        stored = {str(k): list(v) for k, v in stored.items()}
    except (ValueError, TypeError, AttributeError):
        raise PeftkitError(
            f"adapter {str(path)!r} has unreadable 'base_shapes' metadata: the file is damaged or "
            "was edited; save the adapter again"
        ) from None
    here = base_shapes(model, targets)
    base = metadata.get("base_model") or "unknown"
    for name in sorted(set(stored) | set(here)):
        if name not in here:
            raise PeftkitError(
                f"adapter {str(path)!r} does not fit this model: module {name!r} (from base {base!r}) "
                "is missing here"
            )
        if name not in stored:
            raise PeftkitError(
                f"adapter {str(path)!r} does not fit this model: module {name!r} is targeted here "
                f"but the adapter (made for base {base!r}) has no weights for it"
            )
        if stored[name] != here[name]:
            raise PeftkitError(
                f"adapter {str(path)!r} does not fit this model: module {name!r} has weight shape "
                f"{tuple(here[name])} here but {tuple(stored[name])} in base {base!r}"
            )
    raise PeftkitError(
        f"adapter {str(path)!r} was made for another base model ({base!r}): fingerprints differ"
    )
