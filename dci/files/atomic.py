"""The one way this pack writes ``.safetensors`` files: atomically, and never half a group.

A file is written to a temporary name in its own folder and renamed into place (one ``os.replace``), so a
crash, a full disk or a Cancel never leaves a torn file where a reader looks. Several files that belong together
(a LoRA and its embedding) are all written to temporary names first and renamed only when all succeeded; a
folder is built beside its target and renamed into place as one unit. Existing files with identical content
are left as they are, so running a workflow again is not an error.

Plain torch + safetensors: no ComfyUI import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

Tensors = dict[str, torch.Tensor]
Metadata = dict[str, str]


def write_temp(folder: Path, stem: str, tensors: Tensors, metadata: Metadata) -> Path:
    """A complete safetensors file under a temporary name in ``folder``; the caller renames or removes it."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def write_safetensors(path: str | os.PathLike, tensors: Tensors, metadata: Metadata | None = None) -> Path:
    """Write one file atomically (temporary file in the same folder, then rename); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, path.stem, tensors, metadata or {})
    try:
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def same_content(path: Path, tensors: Tensors, metadata: Metadata) -> bool:
    """True when ``path`` holds exactly these tensors (same dtypes, bit for bit) and this metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            existing_meta = f.metadata() or {}
        existing = load_file(str(path))
    except Exception:  # unreadable means "not the same"
        return False
    if existing_meta != metadata or set(existing) != set(tensors):
        return False
    return all(existing[k].dtype == t.dtype and torch.equal(existing[k], t.cpu()) for k, t in tensors.items())


def write_files(files: dict[Path, tuple[Tensors, Metadata]], overwrite: bool) -> list[tuple[Path, bool]]:
    """Write several .safetensors files all or nothing; never replaces a different file unless ``overwrite``.

    Returns (path, written) per file; an existing file with identical content is left as it is (written=False).
    """
    status, todo = [], {}
    for path, (tensors, meta) in files.items():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path.name}: only .safetensors files are written")
        if path.exists() and same_content(path, tensors, meta):
            status.append((path, False))
        elif path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists with other content; choose another name or allow "
                                  "overwriting")
        else:
            todo[path] = (tensors, meta)
    temps: dict[Path, Path] = {}
    try:
        for path, (tensors, meta) in todo.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = write_temp(path.parent, path.stem, tensors, meta)
        for path, tmp in temps.items():
            os.replace(tmp, path)
            status.append((path, True))
    finally:
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()
    return status


def write_folder(folder: Path, files: dict[str, tuple[Tensors, Metadata]], overwrite: bool) -> list[tuple[Path, bool]]:
    """Write a folder of .safetensors files as one unit: built beside the target, then renamed into place."""
    if folder.exists():
        same = (folder.is_dir() and {p.name for p in folder.iterdir()} == set(files)
                and all(same_content(folder / n, t, m) for n, (t, m) in files.items()))
        if same:
            return [(folder / n, False) for n in files]
        if not overwrite:
            raise FileExistsError(f"{folder} already exists with other content; choose another name or allow "
                                  "overwriting")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old = None
    try:
        for name, (tensors, meta) in files.items():
            os.replace(write_temp(staging, Path(name).stem, tensors, meta), staging / name)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
        try:
            os.replace(staging, folder)
        except BaseException:
            if old is not None:
                os.replace(old / folder.name, folder)
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return [(folder / n, True) for n in files]


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write any other file (e.g. a PNG image) atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
