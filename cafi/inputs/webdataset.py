"""WebDataset samples from tar members, as img2dataset and NeMo Curator write them.

A sample is a run of consecutive members sharing a key: the member path up to the first '.' of its
file name (`images/000123.face.jpg` -> key `images/000123`, suffix `face.jpg`). Its image is the
member whose suffix comes first in `input.image_extensions`; `<key>.json` holds the fields that
`input.keep_columns` copies. Members whose name has no suffix and directories are not samples.

Every sample leaves one row. Error rows, each with its reason: no image member; an image member that
is empty, not an image, or over the limits (header check); a key seen earlier in the shard (its
uri gets `#2`, `#3`, ... so it stays unique; the first one is scored); a sample whose image member is
cut off by the end of a truncated shard. A `.json` that cannot be parsed (any reason, a nesting too
deep included) leaves the sample's kept fields null and counts as bad_json. A shard that ends early
or has a corrupt header (a bad size field or pax record, an extended header over its limit: see
tar.py) also gets a row of its own (uri = the shard uri) saying from where on nothing could be read,
why, and how many samples were read before it; those samples keep their rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from cafi.config import ImageConfig
from cafi.inputs import keep, tar
from cafi.inputs.rows import Sample
from cafi.inputs.uris import sample_uri

MAX_JSON_BYTES = 16 * 2**20


def split_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a member name; None for a name without a suffix."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), suffix


class Keys:
    """Uris unique within a shard: a repeated key gets `#2`, `#3`, ... and an error.

    Linear in the number of keys, however often one repeats: the next suffix of each repeated key is
    remembered, and a generated name already taken (a key that is itself `k#3`) is passed over. The
    names are those of trying `#2`, `#3`, ... in turn: the smallest suffix not taken yet."""

    def __init__(self, shard: str):
        self.shard, self.seen = shard, set()
        self.next: dict[str, int] = {}  # repeated key -> the suffix to try first next time

    def unique(self, key: str) -> tuple[str, str | None]:
        """The key the sample is known by in this shard (its uri's key, and its shard index's), and the
        error of a repeated one."""
        if key not in self.seen:
            self.seen.add(key)
            return key, None
        n = self.next.get(key, 2)  # every suffix below it is taken (by this key or by a key named so)
        while f"{key}#{n}" in self.seen:
            n += 1
        self.next[key] = n + 1
        self.seen.add(f"{key}#{n}")
        return f"{key}#{n}", (f"duplicate key in shard: {key!r} appears again (occurrence {n}); only the first "
                              "one is scored")

    def uri(self, key: str) -> tuple[str, str | None]:
        unique, dup = self.unique(key)
        return sample_uri(self.shard, unique), dup


class _Group:
    def __init__(self, key: str):
        self.key = key
        self.members: dict[str, tar.Member] = {}
        self.repeated: list[str] = []
        self.cut: tar.Truncated | None = None


def samples(stream, shard: str, image_cfg: ImageConfig, image_extensions: list[str], kept: list[str]
            ) -> Iterator[Sample]:
    """Every sample of a tar shard, in archive order, then (if it ends early or breaks) the shard's own row."""
    exts = [e.lstrip(".").lower() for e in image_extensions]
    keys = Keys(shard)

    def want(name: str, size: int) -> bool:
        split = split_name(name)
        if split is None:
            return False
        suffix = split[1].lower()
        return (suffix in exts and size <= image_cfg.max_bytes) or (suffix == "json" and bool(kept)
                                                                    and size <= MAX_JSON_BYTES)

    read = 0

    def finish(group: _Group) -> Sample:
        nonlocal read
        read += 1
        key, dup = keys.unique(group.key)
        return _sample(group, key, sample_uri(shard, key), dup, exts, kept, image_cfg)

    def ended(fault: tar.TarError) -> Sample:
        """The shard's own row: why the archive ends here, and how many samples it gave before."""
        return Sample(shard, None, error=f"{fault} ({read} sample{'' if read == 1 else 's'} read before it)")

    group: _Group | None = None
    try:
        for member in tar.members(stream, want):
            split = split_name(member.name)
            if split is None:
                continue
            key, suffix = split
            if group is not None and key != group.key:
                yield finish(group)
                group = None
            if group is None:
                group = _Group(key)
            if suffix.lower() in group.members:
                group.repeated.append(suffix)
            group.members.setdefault(suffix.lower(), member)
    except tar.Truncated as cut:
        split = split_name(cut.member.name) if cut.member is not None else None
        if split is not None:  # a member's data is cut off: its sample is an error row
            if group is not None and group.key != split[0]:
                yield finish(group)
                group = None
            if group is None:
                group = _Group(split[0])
            group.cut = cut
            yield finish(group)
            return
        if group is not None:
            yield finish(group)
        yield ended(cut)
        return
    except tar.TarError as bad:  # a corrupt header: the samples before it stand
        if group is not None:
            yield finish(group)
        yield ended(bad)
        return
    if group is not None:
        yield finish(group)


def _sample(group: _Group, key: str, uri: str, dup: str | None, exts: list[str], kept: list[str],
            image_cfg: ImageConfig) -> Sample:
    image = next((group.members[e] for e in exts if e in group.members), None)
    sample = Sample(uri, key, error=dup)  # a repeated key's sample is `key#n`, in its uri and in the index
    if image is not None:
        sample.offset, sample.size = image.offset, image.size
    if sample.error is None and group.cut is not None:
        sample.error = str(group.cut)
    elif sample.error is None and group.repeated:
        sample.error = f"duplicate member in shard: {group.key}.{group.repeated[0]} appears twice in a row"
    elif sample.error is None and image is None:
        present = ", ".join("." + s for s in sorted(group.members)) or "none"
        sample.error = (f"no image member: the sample's members are {present}; input.image_extensions: "
                        f"{', '.join(exts)}")
    elif sample.error is None and image.data is None:
        sample.error = (f"file too large: {image.size} bytes > image.max_bytes={image_cfg.max_bytes}" if image.regular
                        else f"the image member {image.name} is not a regular file")
    elif sample.error is None:
        sample.data = image.data
    if kept:
        sample.kept, sample.bad_json = _kept(group.members.get("json"), kept)
    return sample.check(image_cfg)


def _kept(member: tar.Member | None, names: list[str]) -> tuple[dict, bool]:
    """The named fields of the sample's .json (a missing member or field: null), and whether the
    member is there but not a JSON object (its fields are null too; the shard index counts it).
    A .json that cannot be read for any reason (not JSON, nested too deep to parse or to write back,
    over MAX_JSON_BYTES) is the sample's fault alone: never an exception that would end the shard."""
    if member is None:
        return {}, False
    try:
        doc = json.loads(member.data) if member.data is not None else None
        if not isinstance(doc, dict):
            return {}, True
        return {n: keep.json_text(doc.get(n)) for n in names}, False
    except Exception:  # noqa: BLE001 - ValueError, RecursionError, MemoryError...: the sample's bad_json
        return {}, True
