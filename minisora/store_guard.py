"""What `encode` may write into or delete, and whether a store's latents belong to a given VAE.

A latent store owns exactly these entries of its directory (see minisora/store.py)::

    zarr.json  manifest.json  <split>/{zarr.json, mean, logvar, actions, length, _commits}

`encode --out` writes only into a new path, an empty directory or a minisora store; `--overwrite`
deletes only a minisora store, and of it only the entries above (anything else the user put there
stays, and so does the directory then). A store records the digest of its VAE's weights
(`vae.weights_sha256`); latents are decoded only by a VAE with the same digest. Stores made before
the digest existed cannot be checked: they are used with a warning.

One `encode` at a time writes a local store: it holds LOCK_NAME in the store's directory (created with
O_CREAT|O_EXCL, holding the pid and host), removed when it ends. A second one is refused, naming the
holder; a lock left by a process that is gone (same host, dead pid) is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from contextlib import contextmanager

from minisora.errors import MinisoraWarning, unwritable_reason
from minisora.store import ARRAYS_5D, StoreError, _fs_and_root

SPLIT_ENTRIES = ("zarr.json", *ARRAYS_5D, "actions", "length", "_commits")
ROOT_ENTRIES = ("zarr.json", "manifest.json")
LOCK_NAME = ".minisora-encode.lock"  # not a store entry: never listed, never deleted by remove_store


def _names(fs, path: str) -> set[str]:
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} - {LOCK_NAME}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _take_lock(file: str, url: str) -> bool:
    """Create the lock file; False when a live process holds it (a dead holder's lock is taken over)."""
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for _ in range(2):
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(open(file).read())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") != socket.gethostname() or _pid_alive(int(holder.get("pid", 0)) or 1):
                raise StoreError(f"{url}: another encode is writing this store (lock {file} held by pid "
                                 f"{holder.get('pid', '?')} on {holder.get('host', '?')} since "
                                 f"{holder.get('since', '?')}); wait for it to end, or remove the lock file if that "
                                 "process is gone")
            os.unlink(file)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


@contextmanager
def encode_lock(url: str):
    """Hold the store's encode lock for the duration (local stores only).

    An fsspec URL (s3://, memory://, ...) is not locked: object stores offer no atomic create-if-absent that
    every backend honours, so two encodes there must be kept apart by the user."""
    fs, root, local = _fs_and_root(url)
    if not local:
        yield
        return
    os.makedirs(root, exist_ok=True)
    file = os.path.join(root, LOCK_NAME)
    if not _take_lock(file, url):
        raise StoreError(f"{url}: cannot take the lock {file}; try again")
    try:
        yield
    finally:
        try:
            os.unlink(file)
        except FileNotFoundError:
            pass


def store_attrs(fs, root: str) -> dict | None:
    """The root attributes when ROOT/zarr.json is a zarr group's metadata; None otherwise."""
    try:
        doc = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return (doc.get("attributes") or {}) if isinstance(doc, dict) and doc.get("node_type") == "group" else None


def is_store(fs, root: str) -> bool:
    """ROOT is a minisora store, or what `LatentStore.create` leaves when killed before its attributes
    (which it writes last): a bare or half-written zarr.json next to nothing but a manifest copy and
    split groups."""
    from minisora.data.manifest import SPLITS

    if not fs.exists(f"{root}/zarr.json"):
        return False
    attrs = store_attrs(fs, root)
    if attrs is not None and attrs.get("schema") == "minisora.latents":
        return True
    return "schema" not in (attrs or {}) and _names(fs, root) <= {*ROOT_ENTRIES, *SPLITS}


def check_out(url: str) -> None:
    """Refuse an --out that is a file, lies under a file, cannot be written, or is a non-empty
    directory that is not a minisora store. A new path, an empty directory and a store pass."""
    fs, root, local = _fs_and_root(url)
    if local:
        if os.path.isfile(root):
            raise StoreError(f"{url}: is an existing file; --out must be a new or empty directory or a latent store")
        if (reason := unwritable_reason(root)) is not None:
            raise StoreError(f"{url}: {reason}; choose another --out")
    if not fs.isdir(root):
        return
    names = _names(fs, root)
    if not names:
        return
    if not is_store(fs, root):
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise StoreError(
            f"{url}: is a non-empty directory that is not a minisora latent store (holds {shown}); "
            "choose a new or empty --out (nothing there was changed)"
        )


def remove_store(url: str, splits) -> None:
    """Delete a minisora store's own entries (ROOT_ENTRIES, and SPLIT_ENTRIES of each split), nothing else.

    The directory itself goes only when nothing else is left in it. Refuses a path that is not a store."""
    fs, root, _ = _fs_and_root(url)
    if not is_store(fs, root):
        raise StoreError(
            f"{url}: not a minisora latent store, refusing to delete it; remove it yourself or choose another --out"
        )
    attrs = store_attrs(fs, root) or {}
    for split in sorted(set(splits) | set(attrs.get("splits") or {})):
        base = f"{root}/{split}"
        if not fs.isdir(base):
            continue
        for name in SPLIT_ENTRIES:
            if fs.exists(f"{base}/{name}"):
                fs.rm(f"{base}/{name}", recursive=True)
        if not _names(fs, base):
            fs.rm(base, recursive=True)
    for name in ROOT_ENTRIES:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")
    if fs.isdir(root) and not fs.ls(root, detail=False):  # a held lock keeps the directory
        fs.rm(root, recursive=True)


def check_vae(store_vae: dict | None, digest: str, where: str, vae_name: str) -> None:
    """Refuse latents (recorded with `store_vae`, store attribute "vae") for a VAE whose weights digest differs.

    `where` names the store, `vae_name` the other VAE; an old store without a digest only warns."""
    recorded = (store_vae or {}).get("weights_sha256")
    if recorded is None:
        warnings.warn(
            f"{where}: the store records no VAE weights digest (encoded by an older minisora), so it cannot "
            f"be checked that its latents belong to {vae_name}; re-encode it to make this check",
            MinisoraWarning,
            stacklevel=2,
        )
        return
    if recorded != digest:
        raise StoreError(
            f"{where}: latents were encoded by VAE weights {recorded[:16]} "
            f"({(store_vae or {}).get('source')}), but {vae_name} has weights {digest[:16]}; "
            "decoding them with another VAE gives meaningless frames: use the store encoded with this "
            "VAE, or re-encode with it"
        )
