"""A shard sample's uri is `<shard uri>#<key>`: the shard it lives in, then its key (WebDataset's
`__key__`: the member path up to the first '.' of its name; for Parquet the key column, or the row
index). Everything keyed on `uri` (resume, reuse, the report, `cafi eval`) works on it unchanged.

The shard part never holds a '#': in a shard's name '%' is written `%25` and '#' `%23` (only these
two, so every other name reads as it is), and the first '#' ends it. Keys may hold anything, '#'
included. A shard named `x.tar#y.tar` gives `x.tar%23y.tar#<key>`: one reading only. Only shard
inputs are split: a plain object's name may contain '#' (input.format files).
"""

from __future__ import annotations

SHARD_SUFFIXES = {"webdataset": (".tar",), "parquet": (".parquet",)}
SHARD_NAMES = (".tar", ".parquet")


def _escape(shard: str) -> str:
    return shard.replace("%", "%25").replace("#", "%23")


def _unescape(part: str) -> str:
    return part.replace("%23", "#").replace("%25", "%")


def sample_uri(shard: str, key: str) -> str:
    return f"{_escape(shard)}#{key}"


def split_sample_uri(uri: str) -> tuple[str, str] | None:
    """(shard uri, key) of a shard sample's uri; None when it names no sample (a whole object or shard)."""
    part, sep, key = uri.partition("#")
    if not sep or not part.lower().endswith(SHARD_NAMES):
        return None
    return _unescape(part), key
