"""Digests of the latent store's root attributes that change results, and their check.

`vae` (the VAE's identity, its scaling and shift factors) and `latent_stats` (what training normalises
with, and what the pipeline copies for sampling) are recorded with their sha256 in the attribute
`meta_sha256` when the store is finalized, and again whenever minisora itself changes them
(LatentStore.set_attrs). A hand edit of zarr.json therefore shows as a mismatch that names the
attribute. Stores from before the digests are accepted with one warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings

from minisora.errors import MinisoraWarning
from minisora.store_schema import StoreError

META_KEYS = ("vae", "latent_stats")  # root attributes whose digests `meta_sha256` records
_warned: set[str] = set()  # stores already warned about in this process: one line each


def meta_digests(attrs: dict) -> dict[str, str]:
    """sha256 of each META_KEYS attribute present in `attrs`, as canonical JSON."""
    return {k: hashlib.sha256(json.dumps(attrs[k], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            for k in META_KEYS if k in attrs}


def check_meta(url: str, attrs: dict) -> None:
    """The attributes META_KEYS of store `url` against the digests recorded in its `meta_sha256`."""
    recorded = attrs.get("meta_sha256")
    if recorded is None:
        if url in _warned:
            return
        _warned.add(url)
        warnings.warn(f"{url}: the store records no digest of its VAE and latent statistics (encoded by an older "
                      "minisora), so an edit of them cannot be found; re-encode it to make this check",
                      MinisoraWarning, stacklevel=3)
        return
    now = meta_digests(attrs)
    for key in META_KEYS:
        if recorded.get(key) != now.get(key):
            raise StoreError(f"{url}: attribute {key!r} in zarr.json differs from the one the store was encoded "
                             "with (its sha256 in meta_sha256 does not match): the metadata was edited or damaged; "
                             "restore it or re-encode the store")
