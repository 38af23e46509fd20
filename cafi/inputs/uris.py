"""A shard sample's uri is `<shard uri>#<key>`: the shard it lives in, then its key (WebDataset's
`__key__`: the member path up to the first '.' of its name; for Parquet the key column, or the row
index). Everything keyed on `uri` (resume, reuse, the report, `cafi eval`) works on it unchanged.

Splitting takes the first '#' that follows a shard name ending (`.tar`, `.parquet`), so keys may hold
'#'. Only shard inputs are split: a plain object's name may contain '#' (input.format files).
"""

from __future__ import annotations

SHARD_SUFFIXES = {"webdataset": (".tar",), "parquet": (".parquet",)}


def sample_uri(shard: str, key: str) -> str:
    return f"{shard}#{key}"


def split_sample_uri(uri: str) -> tuple[str, str] | None:
    """(shard uri, key) of a shard sample's uri; None when it names no sample (a whole object or shard)."""
    start = 0
    while True:
        at = uri.find("#", start)
        if at < 0:
            break
        if uri[:at].lower().endswith((".tar", ".parquet")):
            return uri[:at], uri[at + 1:]
        start = at + 1
    at = uri.find("#")
    return (uri[:at], uri[at + 1:]) if at > 0 else None
