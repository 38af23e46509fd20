"""Checkpoints named by URI + sha256: fetched once per node into a cache, verified, loaded safely.

Nothing here runs at import time. `torch.load` is always called with `weights_only=True`,
so a checkpoint can hold tensors and plain containers but never code.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cafi.config import StorageConfig
from cafi.errors import WeightsError
from cafi.redact import redact_text, redact_uri
from cafi.storage import filesystem, protocol_of

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint as the job uses it."""

    model: str  # the model it belongs to, for error messages
    uri: str
    sha256: str
    state_key: str | None = None  # key of the state dict inside the file (pyiqa: "params")
    synthetic: bool = False
    # Key renaming (the record's, cafi.models.registry.Pretrained): drop, then strip one prefix.
    strip_prefixes: tuple[str, ...] = ("module.",)
    drop_prefixes: tuple[str, ...] = ()


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(ckpt: Checkpoint, cache_dir: str, storage: StorageConfig | None = None) -> str:
    """A verified local copy of the checkpoint; downloads at most once per node.

    Local files are verified in place. Remote files land in `cache_dir/<sha256>/<name>`;
    concurrent callers on one node serialise on a lock file, so one downloads and the
    others find the verified copy. A download goes to a name of its own (host, process and a
    random part: a cache shared between nodes, e.g. on NFS, never mixes two downloads) and is
    renamed into place once verified. A cached copy that fails its sha256 (truncated, corrupted)
    is removed and fetched again, once; a download that fails it is the error.
    """
    if protocol_of(ckpt.uri) == "file":
        path = ckpt.uri[len("file://"):] if ckpt.uri.startswith("file://") else ckpt.uri
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise WeightsError(f"{ckpt.model}: checkpoint not found: {redact_uri(ckpt.uri)}")
        _verify(ckpt, path)
        return path

    expected = ckpt.sha256.lower()
    target_dir = os.path.join(os.path.expanduser(cache_dir), expected)
    os.makedirs(target_dir, exist_ok=True)
    name = os.path.basename(redact_uri(ckpt.uri).split("#", 1)[0].split("?", 1)[0])  # never a credential
    target = os.path.join(target_dir, name or "checkpoint.pth")
    with open(os.path.join(target_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stale = ""
        if os.path.isfile(target):
            cached = sha256_of(target)
            if cached == expected:
                return target
            _remove(target)  # not what was pinned: fetched again, once
            stale = f" (the cached copy had sha256 {cached} and was removed)"
        partial = partial_name(target)
        actual = _download(ckpt.model, ckpt.uri, partial, storage)
        if actual != expected:
            hint = _html_hint(partial)
            _remove(partial)
            raise WeightsError(f"{ckpt.model}: sha256 mismatch for {redact_uri(ckpt.uri)}: expected {expected}, "
                               f"got {actual}{hint}{stale}")
        os.replace(partial, target)
        return target


def partial_name(target: str) -> str:
    """Where a download of `target` goes until it is verified: unique per host, process and call."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"
    return f"{target}.partial.{host}.{os.getpid()}.{secrets.token_hex(4)}"


def fetch_unpinned(model: str, uri: str, file_name: str, cache_dir: str, storage: StorageConfig | None = None,
                   expect_prefix: str = "") -> tuple[str, str]:
    """Download a checkpoint that has no published digest: (local path, its sha256). Only
    `cafi weights fetch` uses this, to tell the user the digest to pin; `expect_prefix` (the
    digest prefix a pyiqa file name carries) is checked when given."""
    staging = os.path.join(os.path.expanduser(cache_dir), "unpinned")
    os.makedirs(staging, exist_ok=True)
    partial = partial_name(os.path.join(staging, file_name))
    actual = _download(model, uri, partial, storage)
    if expect_prefix and not actual.startswith(expect_prefix.lower()):
        hint = _html_hint(partial)
        _remove(partial)
        raise WeightsError(f"{model}: {redact_uri(uri)} has sha256 {actual}, but its name says it starts with "
                           f"{expect_prefix}{hint}")
    target_dir = os.path.join(os.path.expanduser(cache_dir), actual)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, file_name)
    os.replace(partial, target)
    return target, actual


def _download(model: str, uri: str, partial: str, storage: StorageConfig | None) -> str:
    """Copy uri to the local file `partial`; return its sha256. No partial file survives an error."""
    try:
        fs, path = filesystem(uri, storage)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as src, open(partial, "wb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                dst.write(chunk)
    except Exception as exc:  # noqa: BLE001 - any transport error means the same to the user
        _remove(partial)
        raise WeightsError(f"{model}: cannot fetch checkpoint {redact_uri(uri)}: {type(exc).__name__}: "
                           f"{redact_text(str(exc))}") from None
    return digest.hexdigest()


def _html_hint(path: str) -> str:
    """A web page instead of a checkpoint (a login or confirmation page of a file host) says more
    than the digest does."""
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return (" (the server sent a web page, not the file: download it yourself and point "
                "weights.uri at the copy)")
    return ""


def _verify(ckpt: Checkpoint, path: str) -> None:
    actual = sha256_of(path)
    if actual != ckpt.sha256.lower():
        raise WeightsError(
            f"{ckpt.model}: sha256 mismatch for {redact_uri(ckpt.uri)}: expected {ckpt.sha256.lower()}, "
            f"got {actual}{_html_hint(path)}"
        )


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_state_dict(ckpt: Checkpoint, path: str) -> dict[str, torch.Tensor]:
    """Unpickle with weights_only, unwrap the state key, rename the keys (drop the keys under
    `drop_prefixes`, strip the first matching `strip_prefixes` entry: DataParallel's `module.`
    by default)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{ckpt.model}: {redact_uri(ckpt.uri)} holds more than tensors and was refused by "
            f"torch.load(weights_only=True): {redact_text(str(exc).splitlines()[0])}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise WeightsError(f"{ckpt.model}: {redact_uri(ckpt.uri)} is not a readable checkpoint: "
                           f"{redact_text(str(exc))}") from None
    if ckpt.state_key is not None:
        if not isinstance(obj, Mapping) or ckpt.state_key not in obj:
            raise WeightsError(f"{ckpt.model}: {redact_uri(ckpt.uri)} has no '{ckpt.state_key}' entry")
        obj = obj[ckpt.state_key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{ckpt.model}: {redact_uri(ckpt.uri)} does not hold a state dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if ckpt.drop_prefixes and key.startswith(ckpt.drop_prefixes):
            continue
        name = next((key[len(p):] for p in ckpt.strip_prefixes if key.startswith(p)), key)
        if name in state:
            raise WeightsError(f"{ckpt.model}: {redact_uri(ckpt.uri)} holds {name!r} twice (with and without a "
                               "prefix)")
        state[name] = value
    return state


def _holds_tensors_outside_its_state(net: torch.nn.Module) -> bool:
    """Tensors a checkpoint would not fill: non-persistent buffers, or plain tensor attributes."""
    for m in net.modules():
        if m._non_persistent_buffers_set or any(isinstance(v, torch.Tensor) for v in vars(m).values()):
            return True
    return False


def build_loaded(builder, ckpt: Checkpoint, cache_dir: str, storage: StorageConfig | None = None) -> torch.nn.Module:
    """`builder()` with the checkpoint loaded into it, built without initialising its parameters: on the
    meta device, then the checkpoint's tensors assigned (random init of DBCNN's VGG16 alone takes 2 s,
    all of it overwritten). A module that cannot be built there, or holds tensors outside its state dict,
    is built normally."""
    try:
        with torch.device("meta"):
            net = builder()
    except (NotImplementedError, RuntimeError):  # it moves or computes tensors while it is built (RetinaFace)
        net = None
    if net is None or _holds_tensors_outside_its_state(net):
        return load_into(builder(), ckpt, cache_dir, storage)
    return load_into(net, ckpt, cache_dir, storage, assign=True)


def load_into(module: torch.nn.Module, ckpt: Checkpoint, cache_dir: str, storage: StorageConfig | None = None,
              assign: bool = False) -> torch.nn.Module:
    """Fetch, verify and strictly load a checkpoint into `module` (`assign`: its tensors become the
    module's, for a module built on the meta device); errors name model and URI."""
    state = read_state_dict(ckpt, fetch(ckpt, cache_dir, storage))
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise WeightsError(f"{ckpt.model}: {redact_uri(ckpt.uri)} does not fit the architecture: "
                           f"{'; '.join(parts)}")
    module.load_state_dict(state, strict=True, assign=assign)
    return module
