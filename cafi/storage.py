"""Filesystems for URIs (local, s3://, gs://, https://, anything fsspec opens).

Credentials come only from the providers' standard chains (environment, shared config
files, instance/pod identity); nothing here reads or writes a secret. An S3-compatible
endpoint (MinIO, Ceph, moto) comes from `storage.endpoint_url` or the standard
`AWS_ENDPOINT_URL` variable.

A URI is `scheme://path` or a local path, and nothing else: fsspec's chained URLs
(`simplecache::s3://...`) are not parsed, so an object named `a::b.jpg` is that object, never
`a` read through a `b.jpg` filesystem.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator

import fsspec
from fsspec import AbstractFileSystem

from cafi.config import StorageConfig

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def protocol_of(uri: str) -> str:
    """The URI's scheme, lower-case; "file" for a plain path (even one whose name holds "://")."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else "file"


def allowed_schemes(inp) -> tuple[str, ...]:
    """input.schemes, or by default the scheme of the input itself (input.uri, else input.manifest)."""
    if inp.schemes:
        return tuple(s.lower() for s in inp.schemes)
    return (protocol_of(inp.uri or inp.manifest or ""),)


def refused_scheme(uri: str, allowed: tuple[str, ...]) -> str | None:
    """Why an input URI is not read (its scheme is not allowed), or None."""
    proto = protocol_of(uri)
    if proto in allowed:
        return None
    return (f"scheme {proto!r} is not allowed for inputs (input.schemes: {list(allowed)}; by default only the "
            "input's own scheme)")


def storage_options(uri: str, cfg: StorageConfig | None, client_retries: bool = True) -> dict:
    """fsspec options for a URI; only endpoint and region, never credentials.

    `client_retries=False`: the S3 client makes one attempt per request, for the callers that
    retry themselves within `storage.retry_budget_s` (cafi/fetch.py), so one policy -- backoff,
    jitter, budget, counted retries -- governs object reads and manifest writes."""
    proto = protocol_of(uri)
    opts: dict = {}
    cfg = cfg if cfg is not None else StorageConfig()
    if proto in ("s3", "s3a"):
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if cfg.region:
            opts["client_kwargs"] = {"region_name": cfg.region}
        if cfg.anon:
            opts["anon"] = True
        if not client_retries:  # botocore: one attempt; s3fs's own loop is set off in filesystem()
            opts["config_kwargs"] = {"retries": {"max_attempts": 1, "mode": "standard"}}
    elif proto in ("gs", "gcs") and cfg.anon:
        opts["token"] = "anon"
    return opts


def filesystem(uri: str, cfg: StorageConfig | None = None, client_retries: bool = True
               ) -> tuple[AbstractFileSystem, str]:
    """The filesystem for a URI and the path inside it (ValueError: unknown scheme; ImportError: its
    package is not installed). Chained URLs are not parsed (the module's docstring)."""
    proto = protocol_of(uri)
    cls = fsspec.get_filesystem_class(proto)
    options = {**cls._get_kwargs_from_urls(uri), **storage_options(uri, cfg, client_retries)}
    fs = fsspec.filesystem(proto, **options)
    path = cls._strip_protocol(uri)
    if not client_retries and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop (a class attribute; config_kwargs keeps this instance apart)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def unstrip(fs: AbstractFileSystem, path: str, like_uri: str) -> str:
    """Give a path returned by a filesystem listing the protocol of the URI it came from."""
    proto = protocol_of(like_uri)
    if proto == "file":
        return path
    return path if "://" in path else f"{proto}://{path}"


def list_files(uri: str, extensions: list[str], cfg: StorageConfig | None) -> Iterator[str]:
    """Every object under a prefix or directory whose name ends with one of the extensions."""
    fs, root = filesystem(uri, cfg)
    exts = tuple(e.lower() for e in extensions)
    if not fs.exists(root):
        from cafi.errors import StorageError
        from cafi.redact import redact_uri

        raise StorageError(f"input.uri: {redact_uri(uri)} does not exist or cannot be listed")
    for path in sorted(fs.find(root)):
        if path.lower().endswith(exts):
            yield unstrip(fs, path, uri)
