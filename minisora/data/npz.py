"""Safe .npz helpers shared by the readers: open without pickle, read .npy headers, read a range of rows.

A probe reads only the .npy headers inside the zip; a window read seeks to the window's first row,
so it reads (and for `np.savez_compressed` archives, inflates) only up to the window's last frame.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from minisora.data.base import ClipError

_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def open_npz(path) -> zipfile.ZipFile:
    """Open an .npz as a zip archive, turning every way it can be broken into a ClipError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except FileNotFoundError:
        raise ClipError(path, "file not found") from None
    except OSError as e:
        raise ClipError(path, f"cannot read ({e.strerror or e})") from e
    if head.startswith(b"\x93NUMPY"):
        raise ClipError(path, "is a single .npy array, not an npz archive")
    if not head.startswith(b"PK"):
        raise ClipError(path, "not an npz (zip) archive")
    try:
        return zipfile.ZipFile(path)
    except _READ_ERRORS as e:
        raise ClipError(path, f"truncated or corrupt npz archive ({e})") from e


def npz_header(zf: zipfile.ZipFile, path, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of array `key` from its .npy header alone; None when the archive lacks it."""
    member = f"{key}.npy"
    if member not in zf.NameToInfo:
        return None
    try:
        with zf.open(member) as f:
            shape, _, dtype = _read_header(f)
    except _READ_ERRORS as e:
        raise ClipError(path, f"`{key}` is not a readable .npy array ({e})") from e
    if dtype.hasobject:
        raise ClipError(path, f"`{key}` is an object array ({dtype}) that needs pickle, refused")
    return shape, dtype


def npz_rows(zf: zipfile.ZipFile, path, key: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of array `key`, reading only those rows' bytes when the array is C-ordered."""
    try:
        with zf.open(f"{key}.npy") as f:
            shape, fortran_order, dtype = _read_header(f)
            if dtype.hasobject:
                raise ClipError(path, f"`{key}` is an object array ({dtype}) that needs pickle, refused")
            if fortran_order or not shape:  # rare layouts: load it all, then slice
                f.seek(0)
                return np.lib.format.read_array(f, allow_pickle=False)[start:stop]
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            f.seek(start * row_bytes, 1)
            buf = bytearray((stop - start) * row_bytes)
            got = f.readinto(buf)
    except ClipError:
        raise
    except _READ_ERRORS as e:
        raise ClipError(path, f"`{key}` cannot be read ({e})") from e
    if got != len(buf):
        raise ClipError(path, f"`{key}` is truncated: {got} of {len(buf)} bytes for rows [{start}, {stop})")
    return np.frombuffer(buf, dtype).reshape((stop - start, *shape[1:]))  # (rows, *row_shape)


def check_actions(path, header: tuple[tuple[int, ...], np.dtype], frames: int, video: str = "`video`") -> None:
    """Actions must be one integer per frame: shape (frames,)."""
    shape, dtype = header
    if not np.issubdtype(dtype, np.integer):
        raise ClipError(path, f"`actions` must be integers, got {dtype}")
    if len(shape) != 1:
        raise ClipError(path, f"`actions` must be 1-D (T,), got shape {shape}")
    if shape[0] != frames:
        raise ClipError(path, f"`actions` has {shape[0]} entries but {video} has {frames} frames")


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)  # 2.0 and 3.0 share the header layout
