"""Secrets kept out of everything a run prints or writes about itself.

A URI may carry a credential in its userinfo (`https://user:token@host/...`) or its query (a presigned
`?X-Amz-Signature=...`, `?sig=...`), and a config value may come from an interpolation such as
`${oc.env:TOKEN}`. Summaries, reports, log lines and error messages show URIs through `redact_uri`
(scheme, host, path and the `#<key>` of a shard sample: userinfo and query dropped) and the config
through `redacted_config` (interpolated strings as their interpolation text, never resolved). The
values used to read and write are never changed: this is for showing only.

Imports nothing of cafi at module level, so the package can install the log filter on import.
"""

from __future__ import annotations

import logging
import re

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_URI_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A URI inside free text (an exception's message): from its scheme to the next blank or quote.
_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*")
_AUTHORITY = re.compile(r"[^/?#]*")


def _split_authority(rest: str) -> tuple[str, str]:
    end = _AUTHORITY.match(rest).end()  # type: ignore[union-attr]
    return rest[:end], rest[end:]


def redact_uri(uri):
    """`uri` without its userinfo and query string: scheme, host[:port], path and fragment (`#<key>`).

    A plain path (no `scheme://`) and anything that is not a string come back unchanged."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    scheme, _, rest = uri.partition("://")
    if not _SCHEME.fullmatch(scheme):
        return uri
    authority, tail = _split_authority(rest)
    if "@" in authority:
        authority = authority.rpartition("@")[2]
    elif (":" in authority and not authority.startswith("[") and not authority.rpartition(":")[2].isdigit()
          and "@" in tail):
        # `user:pass@host` whose unencoded password holds '/', '?' or '#': the userinfo ends at the '@'
        authority, tail = _split_authority(tail[tail.index("@") + 1:])
    before, hash_, fragment = tail.partition("#")
    return f"{scheme}://{authority}{before.split('?', 1)[0]}{hash_}{fragment}"


def redact_text(text):
    """Free text (an error or log message) with every URI in it redacted."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _IN_TEXT.sub(_redact_match, text)


def _redact_match(m: re.Match) -> str:
    uri = m.group(0)
    core = uri.rstrip(".,;:!)]}")  # sentence punctuation after a URI stays text
    return redact_uri(core) + uri[len(core):]


def redact_value(value):
    """One config or summary value: a URI redacted whole (it may hold blanks), other text's URIs redacted."""
    if not isinstance(value, str):
        return value
    return redact_uri(value) if _URI_START.match(value) else redact_text(value)


def redact_values(obj):
    """A JSON-like structure (a summary's config) with every string redacted (`redact_value`)."""
    return _redacted(obj, None)


def _is_interpolation(raw) -> bool:
    return isinstance(raw, str) and "${" in raw


def _redacted(value, raw):
    """`value` (resolved) redacted; `raw` is the same node before interpolation, where known."""
    if _is_interpolation(raw) and isinstance(value, (str, dict, list)):
        # From an interpolation: written as its text, never resolved (numbers, booleans and null
        # resolved from one are settings, not secrets: they stay, and readers of the summary use them).
        return redact_value(raw)
    if isinstance(value, dict):
        return {k: _redacted(v, raw.get(k) if isinstance(raw, dict) else None) for k, v in value.items()}
    if isinstance(value, list):
        same = isinstance(raw, list) and len(raw) == len(value)
        return [_redacted(v, raw[i] if same else None) for i, v in enumerate(value)]
    return redact_value(value)


def redacted_config(cfg) -> dict:
    """The config as summaries and reports show it: every URI redacted, and every string that came
    from an interpolation (`${oc.env:TOKEN}`, `${other.key}`) written as its interpolation text.

    Which values came from interpolations is known from the unresolved config `load_config` keeps
    beside the typed one (`cafi.config.unresolved`); a config built in code has none, and then
    only the URIs are redacted."""
    from cafi.config import to_dict, unresolved

    return _redacted(to_dict(cfg), unresolved(cfg))


def is_interpolation_text(value) -> bool:
    """A summary value written as interpolation text: a reader cannot know what it resolved to."""
    return _is_interpolation(value)


class RedactingFilter(logging.Filter):
    """Redacts the URIs in every record of the `cafi` logger (the message with its arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, not ours
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def install_log_filter(logger_name: str = "cafi") -> None:
    """Put the redacting filter on the `cafi` logger once (every cafi module logs through it)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
