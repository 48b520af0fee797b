"""Durable file writes (nothing half-written ever looks finished) and safe checkpoint reads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class CheckpointFileError(ValueError):
    """A file that is not a PyTorch checkpoint avprune can read safely; the message names it."""


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems refuse to open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success fsync it and `os.replace` it onto `dest`.

    On any exception the temporary file is removed and `dest` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; artifacts should get the usual umask-derived mode.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def replace_into(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move a finished, fsynced file (e.g. written by :func:`atomic_path` in a temporary folder
    beside ``dest``, same file system) onto ``dest`` atomically, and make the rename durable."""
    dest = Path(dest)
    os.replace(src, dest)
    _fsync_dir(dest.parent)
    return dest


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(dest: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear error for a bad file.

    Random bytes, a text file, a truncated archive: "not a PyTorch checkpoint (or damaged): PATH".
    A file of pickled Python objects (``torch.save(model)``) is refused with what to save instead;
    avprune never unpickles code, so the message never suggests ``weights_only=False``.
    Every command reads checkpoints through this function.
    """
    import pickle

    path = check_torch_file(path)
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path) and "weights only load failed" in str(e).lower():
            log.debug("%s: weights-only load refused: %s", path, str(e).splitlines()[0])
            raise _pickled_objects_error(path) from None
        cause = e
    except Exception as e:  # noqa: BLE001 - zip, pickle and tensor errors come in many types
        cause = e
    log.debug("%s: torch.load failed: %s: %s", path, type(cause).__name__, str(cause).splitlines()[:1])
    raise CheckpointFileError(f"not a PyTorch checkpoint (or damaged): {path}") from None


def check_torch_file(path: str | os.PathLike) -> Path:
    """The cheap half of :func:`load_torch_file`: the file exists and has a ``torch.save`` layout.

    Decided in microseconds without importing torch, so a text file or random bytes fail at once.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not _looks_like_torch_file(path):
        raise CheckpointFileError(f"not a PyTorch checkpoint (or damaged): {path}")
    return path


def _pickled_objects_error(path: Path) -> CheckpointFileError:
    return CheckpointFileError(
        f"{path} holds pickled Python objects (a whole saved model?), which avprune never loads: "
        "save an avprune checkpoint (avprune train writes one) or the model's state_dict()"
    )


class PeekedTensor:
    """A tensor :func:`peek_torch_file` saw in a checkpoint's pickle; its data was not read."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PeekedTensor()"


class _Inconclusive(Exception):
    """The pickle holds something only torch itself can judge."""


# Modules torch's weights-only unpickler draws its default allow-list from (torch/_weights_only_unpickler.py,
# ``_get_allowed_globals``). A global from any other module (a torchvision model, ``__main__``, ``os``), or an
# ``nn.Module`` class (none is on the list), is refused by ``torch.load(weights_only=True)`` whatever its name.
# avprune never widens the list (no ``add_safe_globals``), so such a file can be refused without torch.
_WEIGHTS_ONLY_NAMESPACES = ("torch", "collections", "builtins", "__builtin__", "_codecs", "numpy")
_MAX_PEEK_BYTES = 64 << 20  # a data.pkl holds the structure, not the tensors: tens of KB for a detector


def _refused_by_weights_only(module: str) -> bool:
    if module == "torch.nn.modules" or module.startswith("torch.nn.modules."):
        return True
    return not any(module == ns or module.startswith(f"{ns}.") for ns in _WEIGHTS_ONLY_NAMESPACES)


def _peeked_tensor(*_args: Any) -> PeekedTensor:
    return PeekedTensor()


class _StorageType:
    """Stands for ``torch.FloatStorage`` and the like: only passed around, never called."""


# The globals torch.save writes for a dict of tensors (an avprune checkpoint, a state_dict), as inert stand-ins.
_PEEK_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,  # a state_dict (its ``_metadata`` set by BUILD), a tensor's hooks
    ("torch._utils", "_rebuild_tensor"): _peeked_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _peeked_tensor,
    ("torch._utils", "_rebuild_parameter"): _peeked_tensor,
}


def peek_torch_file(path: str | os.PathLike) -> Any | None:
    """What ``torch.load(path, weights_only=True)`` holds, read without importing torch (milliseconds).

    Tensors come back as :class:`PeekedTensor` markers (their bytes are not read, so damage there is
    found by :func:`load_torch_file` only). Raises :class:`CheckpointFileError` when torch would refuse
    the file for sure: not a torch file (:func:`check_torch_file`), or pickled Python objects (a global
    from outside the modules torch's weights-only loader accepts anything from). Returns None when only
    torch can tell: the legacy format, a global from those modules this reader does not mimic, an
    unusual or damaged pickle. No code from the file runs: every global maps to an inert stand-in.
    """
    import io
    import pickle

    path = check_torch_file(path)
    if not zipfile.is_zipfile(path):
        return None  # legacy pickle stream: tensors are inline, left to torch.load
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl"))
        if info.file_size > _MAX_PEEK_BYTES:
            return None
        try:
            data = z.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return None  # torch.load names the damage

    class _Peek(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if _refused_by_weights_only(module):
                raise _pickled_objects_error(path)
            if (module, name) in _PEEK_GLOBALS:
                return _PEEK_GLOBALS[module, name]
            if module == "torch" and name.endswith("Storage"):
                return _StorageType
            raise _Inconclusive(f"{module}.{name}")

        def persistent_load(self, pid: Any) -> Any:
            return None  # a tensor's storage record: the bytes stay in the archive

    try:
        return _Peek(io.BytesIO(data)).load()
    except CheckpointFileError:
        raise
    except Exception as e:  # noqa: BLE001 - _Inconclusive, or any pickle this reader does not follow
        log.debug("%s: peek inconclusive (%s: %s); torch.load decides", path, type(e).__name__, e)
        return None


def _looks_like_torch_file(path: Path) -> bool:
    """``torch.save``'s layouts: a zip archive with a ``data.pkl`` record (since torch 1.6), or the
    legacy pickle stream (protocol 2+, first byte 0x80). Text, random bytes and truncated archives
    fail this sniff; anything that passes is still fully checked by ``torch.load``."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return head[:1] == b"\x80"


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_writable_file(dest: str | os.PathLike, *, what: str) -> Path:
    """Fail early, naming ``what`` and the cause, when ``dest`` could not be written later.

    Leaves nothing behind: ``dest`` is not a folder, and its folder, or the nearest existing
    parent (where it would be created), is a folder a probe file can be created in (and removed).
    Raises IsADirectoryError, NotADirectoryError or PermissionError (all OSError).
    """
    dest = Path(dest)
    if dest.is_dir():
        raise IsADirectoryError(f"{what} {dest} is a folder; give a file path")
    parent = dest.parent if str(dest.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {dest}: {existing} is a file, not a folder")
    try:  # a real probe: os.access says yes to root on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".avprune-probe.", dir=existing)
    except OSError as e:
        where = "its folder" if existing == parent else f"{existing}, where its folder would be created,"
        raise PermissionError(f"{what} {dest}: {where} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return dest
