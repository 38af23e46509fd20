"""Tar archives member by member: a reader over a forward-only stream and a deterministic writer.

Our own small reader rather than `tarfile`: it must tell where an archive ends early. `tarfile` in
stream mode takes an archive cut at a member boundary, or inside a header, for a complete one, so a
truncated shard would lose its tail without a word. Here an archive is complete only when its
end-of-archive block (512 zero bytes) is read; anything else raises `Truncated` with the offset, and
the member whose data is cut when it is one.

Formats read: POSIX ustar (with the name prefix), pax extended headers (path, size), GNU long names,
v7. Data of members not wanted is passed over without being kept.

Headers are checked before anything they describe is read: a size field that is not a number (or is
negative), a pax record whose length or `size` is not a decimal number, or a pax / GNU long-name
header body over `MAX_EXTENDED_HEADER` bytes raises `Corrupt` with the header's offset and what is
wrong, and nothing past that header is read (so a crafted header costs at most that much memory).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

BLOCK = 512
RECORD = 20 * BLOCK  # archives are padded to whole records, as tar(1) and Python's tarfile write them
_ZERO = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file, old regular file, contiguous file
_DIR = b"5"
_EXTENDED = (b"x", b"g", b"L", b"K")  # pax (per member, global), GNU long name, GNU long link name
MAX_EXTENDED_HEADER = 2**20  # bytes of one pax / GNU long-name header body; a real one holds a few names
_MAX_DIGITS = 20  # a decimal size or record length longer than this is no size (10**20 bytes)


@dataclass
class Member:
    name: str
    offset: int          # byte offset of the member's data in the archive
    size: int
    regular: bool        # a regular file (not a directory, link or device)
    data: bytes | None   # None when not asked for (or not a regular file)


class TarError(Exception):
    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


class Truncated(TarError):
    """The archive ends early: inside a header, inside `member`'s data, or before its end block."""

    def __init__(self, message: str, offset: int, member: Member | None = None):
        super().__init__(message, offset)
        self.member = member


class Corrupt(TarError):
    """Bytes that are not a tar header where one must be."""


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        return -value if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _show(raw: bytes | str, n: int = 40) -> str:
    """A field's bytes for an error message: its repr, cut to about n characters."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return repr(text[:n]) + ("..." if len(text) > n else "")


def _corrupt(at: int, what: str) -> Corrupt:
    return Corrupt(f"corrupt tar header at byte {at}: {what}; members from there on cannot be read", at)


def _pax(data: bytes, at: int) -> dict[str, str]:
    """Records `<length> <key>=<value>\\n` of a pax extended header (the header at byte `at`); NUL
    padding after the last record is allowed, anything else that is not a record is Corrupt."""
    out, pos = {}, 0
    while pos < len(data):
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break
        space = data.find(b" ", pos, pos + _MAX_DIGITS + 1)
        digits = data[pos:space] if space > pos else b""
        end = pos + int(digits) if digits.isdigit() else -1
        if end <= space + 1 or end > len(data):
            raise _corrupt(at, f"bad pax record length {_show(data[pos:pos + _MAX_DIGITS])} at byte {pos} of "
                               f"its {len(data)}-byte body")
        if data[end - 1:end] != b"\n" or b"=" not in data[space + 1:end]:
            raise _corrupt(at, f"bad pax record {_show(data[pos:end])} (no '=' or no newline at its end)")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return out


def _size(value: str, at: int) -> int:
    """A pax `size` value: a decimal number of bytes."""
    if not (value.isascii() and value.isdigit() and len(value) <= _MAX_DIGITS):
        raise _corrupt(at, f"bad pax size {_show(value)}")
    return int(value)


def _padding(size: int) -> int:
    return -size % BLOCK


def members(stream, want: Callable[[str, int], bool]) -> Iterator[Member]:
    """Every member in archive order; the data of regular members for which `want(name, size)`.

    `stream` has `read(n)`, `skip(n)` and `pos` (cafi/inputs/stream.py). Ends at the end-of-archive
    block; raises Truncated or Corrupt (after yielding every member before the fault).
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    pax_at = 0  # where the pax header that `pax` came from starts
    while True:
        at = stream.pos
        header = stream.read(BLOCK)
        if len(header) == 0:
            if at == 0:
                raise Corrupt("empty shard (0 bytes)", 0)
            raise Truncated(f"the tar ends at byte {at} without its end-of-archive block: truncated "
                            "(members after that point, if any, are missing)", at)
        if len(header) < BLOCK and not header.strip(b"\0"):
            raise Truncated(f"the tar ends at byte {at + len(header)} inside its end-of-archive block: truncated "
                            "(members after that point, if any, are missing)", at + len(header))
        if len(header) < BLOCK:
            raise Truncated(f"the tar is truncated inside a member header at byte {at} (members from there on, "
                            "if any, are missing)", at)
        if header == _ZERO:
            return
        if not _checksum_ok(header):
            if at == 0 and header[:2] == b"\x1f\x8b":
                raise Corrupt("a gzip-compressed tar: shards must be uncompressed .tar (samples are read by "
                              "their byte offset)", 0)
            if at == 0:
                raise Corrupt("not a tar archive (the first header's checksum does not match)", 0)
            raise Corrupt(f"corrupt tar: the member header at byte {at} is not valid (checksum mismatch); "
                          "members from there on cannot be read", at)
        kind = header[156:157]
        try:
            size = _number(header[124:136])
        except ValueError:
            raise _corrupt(at, f"bad size field {_show(header[124:136].rstrip(bytes(1)))}") from None
        if size < 0:
            raise _corrupt(at, f"negative size field ({size})")
        name = _text(header[0:100])
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = _text(header[345:500]) + "/" + name
        if kind in _EXTENDED:  # headers about the next member (or all of them: g)
            if size > MAX_EXTENDED_HEADER:
                raise _corrupt(at, f"an extended header (type {kind.decode('latin-1')}) of {size} bytes, over "
                                   f"the {MAX_EXTENDED_HEADER}-byte limit")
            data = stream.read(size)
            if len(data) < size:
                raise Truncated(f"the tar is truncated inside an extended header at byte {at}", at)
            stream.skip(_padding(size))
            if kind == b"x":
                pax, pax_at = _pax(data, at), at
            elif kind == b"L":
                long_name = _text(data)
            continue
        if "size" in pax:
            size = _size(pax["size"], pax_at)
        name = pax.get("path") or long_name or name
        long_name, pax = None, {}
        offset = stream.pos
        regular = kind in _FILE_TYPES
        member = Member(name, offset, size if regular else 0, regular, None)
        body = size if regular or kind not in (_DIR, b"1", b"2", b"3", b"4", b"6") else 0
        if regular and want(name, size):
            member.data = stream.read(size)
            got = len(member.data)
        else:
            got = stream.skip(body)
        if got < body:
            raise Truncated(f"the tar is truncated: member {name} is cut off at byte {offset + got} of "
                            f"{offset + body} (members after it, if any, are missing)", offset + got, member)
        stream.skip(_padding(body))
        yield member


# ---------------------------------------------------------------- writing

def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def _header(name: bytes, size: int, mtime: int, kind: bytes) -> bytes:
    head = bytearray(BLOCK)
    head[0:len(name)] = name
    head[100:108] = _octal(0o644, 8)
    head[108:116] = _octal(0, 8)
    head[116:124] = _octal(0, 8)
    head[124:136] = _octal(size, 12)
    head[136:148] = _octal(mtime, 12)
    head[148:156] = b" " * 8
    head[156:157] = kind
    head[257:263] = b"ustar\0"
    head[263:265] = b"00"
    head[148:156] = f"{sum(head):06o}".encode() + b"\0 "
    return bytes(head)


class TarWriter:
    """Members written in the order given, with fixed owner, mode and time: the same members give the
    same bytes. Names longer than 100 bytes (or not ASCII) get a pax header."""

    def __init__(self, fh: io.RawIOBase | io.BufferedIOBase, mtime: int = 0):
        self.fh, self.mtime, self.offset = fh, int(mtime), 0

    def _put(self, data: bytes) -> None:
        self.fh.write(data)
        self.offset += len(data)

    def add(self, name: str, data: bytes) -> int:
        """Write one regular file; returns the offset of its data."""
        raw = name.encode("utf-8")
        if len(raw) > 100 or not name.isascii() or len(data) >= 8**11:
            records = b""
            for key, value in (("path", raw), ("size", str(len(data)).encode())):
                body = key.encode() + b"=" + value + b"\n"
                n = len(body) + 2
                while len(str(n)) + 1 + len(body) != n:
                    n = len(str(n)) + 1 + len(body)
                records += str(n).encode() + b" " + body
            self._put(_header(b"././@PaxHeader", len(records), self.mtime, b"x"))
            self._put(records + bytes(_padding(len(records))))
            raw = raw[:100]
        self._put(_header(raw, min(len(data), 8**11 - 1), self.mtime, b"0"))
        at = self.offset
        self._put(data + bytes(_padding(len(data))))
        return at

    def close(self) -> None:
        """The end-of-archive blocks, then padding to a whole record."""
        self._put(bytes(2 * BLOCK))
        self._put(bytes(-self.offset % RECORD))
