"""What a trainer writes to its DIR, any fsspec URI: JSON and text files, a torch checkpoint (with its
sha256), the config block naming it, the held-out identities as a `cafi eval --identities` CSV, and
where Ray Train keeps its checkpoints (DIR/ray). Local copies of remote files for torch.load."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile

from cafi.config import StorageConfig
from cafi.storage import filesystem, join, protocol_of


def write_text(uri: str, text: str, storage: StorageConfig | None) -> None:
    fs, path = filesystem(uri, storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as fh:
        fh.write(text)


def write_json(uri: str, doc: dict, storage: StorageConfig | None) -> None:
    write_text(uri, json.dumps(doc, indent=2, default=float), storage)


def read_json(uri: str, storage: StorageConfig | None) -> dict | None:
    """The JSON document at `uri`, None when there is none."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def put(local: str, uri: str, storage: StorageConfig | None) -> None:
    """Copy a local file to `uri`, streamed."""
    fs, path = filesystem(uri, storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with open(local, "rb") as src, fs.open(path, "wb") as dst:
        for chunk in iter(lambda: src.read(8 << 20), b""):
            dst.write(chunk)


def write_checkpoint(state: dict, uri: str, storage: StorageConfig | None) -> str:
    """torch.save `state` to `uri` (through a local file: its sha256 is the one a loader will check);
    returns the sha256."""
    import torch

    from cafi.weights import sha256_of

    fd, local = tempfile.mkstemp(suffix=".pth")
    os.close(fd)
    try:
        torch.save(state, local)
        digest = sha256_of(local)
        put(local, uri, storage)
    finally:
        os.remove(local)
    return digest


def write_weights_block(uri: str, model: str, weights_uri: str, sha256: str, storage: StorageConfig | None,
                        comment: str | None = None, settings: dict | None = None) -> dict:
    """DIR/<model>.yaml: the config block `models.<model>.weights: {uri, sha256}` (after `settings`, such as
    the arch) that a re-score merges with --config; returns the block."""
    import yaml

    block = {"models": {model: {**(settings or {}), "weights": {"uri": weights_uri, "sha256": sha256}}}}
    text = (f"# {comment}\n" if comment else "") + yaml.safe_dump(block, sort_keys=False)
    write_text(uri, text, storage)
    return block


def write_identities_csv(uri: str, uris, identities, storage: StorageConfig | None) -> int:
    """A `cafi eval --identities` CSV (uri, identity) of the given rows; returns the rows written."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["uri", "identity"])
    n = 0
    for u, i in zip(uris, identities, strict=True):
        w.writerow([u, i])
        n += 1
    write_text(uri, buf.getvalue(), storage)
    return n


class local_copy:
    """A local path to a file of any filesystem (the file itself when local), for torch.load."""

    def __init__(self, uri: str, storage: StorageConfig | None):
        self.fs, self.path = filesystem(uri, storage)
        self.tmp: str | None = None

    def __enter__(self) -> str:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if "file" in protocols:
            return self.path
        fd, self.tmp = tempfile.mkstemp(suffix=".pth")
        os.close(fd)
        self.fs.get(self.path, self.tmp)
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            os.remove(self.tmp)


def ray_storage(out_uri: str) -> str:
    """Ray Train's storage path: DIR/ray (a local path made absolute; a URI as it is)."""
    if protocol_of(out_uri) == "file":
        path = out_uri[len("file://"):] if out_uri.startswith("file://") else out_uri
        return os.path.join(os.path.abspath(os.path.expanduser(path)), "ray")
    return join(out_uri, "ray")
