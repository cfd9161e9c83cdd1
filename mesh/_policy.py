"""Per-subject policy: the models every writer and every node agree on.

A policy is stored as one :class:`PolicyRecord` per subject and section (see
:mod:`mesh._policy_store`): the section's value plus who wrote it, why, its version
and whether an operator pinned it. Sections exist only once something enforces
them; today that is ``codec``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, Literal

import msgspec

from mesh._errors import InvalidName, InvalidPolicy
from mesh._names import validate_subject

#: zstd levels a policy may ask for.
MIN_ZSTD_LEVEL: Final = 1
MAX_ZSTD_LEVEL: Final = 19
#: Bodies smaller than this are sent uncompressed unless a policy says otherwise.
DEFAULT_MIN_SIZE: Final = 256


class CodecPolicy(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="section",
    tag="codec",
):
    """How bodies published on a subject are compressed.

    ``algorithm`` "none" sends bodies as they are; "zstd" compresses those of at least
    ``min_size`` bytes at ``level``, with the trained dictionary ``dictionary`` when it
    is not 0 (an id in the dictionary store).
    """

    algorithm: Literal["none", "zstd"] = "none"
    level: int = 3
    dictionary: int = 0
    min_size: int = DEFAULT_MIN_SIZE


#: The union of every section's value; a new section is appended here.
Section = CodecPolicy
SECTIONS: Final = ("codec",)


class PolicyRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One section of one subject's policy, as stored and as nodes receive it.

    ``version`` starts at 1 and grows by one with every write of this subject and
    section; nodes refuse a version not above the one they hold. ``time`` is Unix ns.
    """

    subject: str
    version: int
    author: str
    reason: str
    time: int
    pinned: bool = False
    value: Section

    @property
    def section(self) -> str:
        return str(self.value.__struct_config__.tag)


# -- keys ----------------------------------------------------------------------------
#
# A KV key may hold only [-/_=.A-Za-z0-9]; a subject may hold any printable ASCII. The key
# of a record is "<section>.<token>.<token>...", each subject token kept as is when it is
# made of safe characters, else encoded. '=' never occurs in a kept token, so it marks an
# encoded one unambiguously: "=S" is '*', "=R" is '>', "=x<hex>" any other token.

#: Records larger than this are refused before decoding.
MAX_RECORD_BYTES: Final = 64 * 1024
MAX_AUTHOR_LENGTH: Final = 64
MAX_REASON_LENGTH: Final = 200
MAX_DICTIONARY_ID: Final = 2**32 - 1
MAX_MIN_SIZE: Final = 64 * 1024 * 1024

_SAFE_TOKEN = re.compile(r"[-/_A-Za-z0-9]+")
_HEX_TOKEN = re.compile(r"=x((?:[0-9a-f]{2})+)")


def _encode_token(token: str) -> str:
    if _SAFE_TOKEN.fullmatch(token):
        return token
    if token == "*":
        return "=S"
    if token == ">":
        return "=R"
    return "=x" + token.encode("ascii").hex()


def policy_key(subject: str, section: str) -> str:
    """The KV key of ``section`` of ``subject`` (a subject or a wildcard pattern).

    Raises :class:`InvalidPolicy` for an invalid subject or an unknown section.
    """
    if section not in SECTIONS:
        raise InvalidPolicy(f"{section}.{subject}", f"unknown section {section!r}")
    try:
        validate_subject(subject, wildcards=True)
    except InvalidName as exc:
        raise InvalidPolicy(f"{section}.{subject}", exc.rule) from None
    return section + "." + ".".join(map(_encode_token, subject.split(".")))


def _decode_token(token: str) -> str:
    if token == "=S":
        return "*"
    if token == "=R":
        return ">"
    match = _HEX_TOKEN.fullmatch(token)
    if match is not None:
        return bytes.fromhex(match[1]).decode("ascii")
    return token


def parse_key(key: str) -> tuple[str, str]:
    """The ``(subject, section)`` a key names; the inverse of :func:`policy_key`.

    Raises :class:`InvalidPolicy` for a key :func:`policy_key` cannot have made.
    """
    section, _, rest = key.partition(".")
    try:
        subject = ".".join(map(_decode_token, rest.split(".")))
    except UnicodeDecodeError:
        raise InvalidPolicy(key, "an encoded token is not ASCII") from None
    try:
        canonical = policy_key(subject, section)
    except InvalidPolicy as exc:
        raise InvalidPolicy(key, exc.reason) from None
    if canonical != key:  # an encoding policy_key would not make: "=x61" for "a"
        raise InvalidPolicy(key, "not a canonical policy key")
    return subject, section


# -- validation and the wire ------------------------------------------------------------


def validate_record(record: PolicyRecord, *, key: str | None = None) -> PolicyRecord:
    """Return ``record`` if a node may apply it, else raise :class:`InvalidPolicy`.

    With ``key``, the record must also be the one stored under that key: a value copied
    under another subject's key is a forgery.
    """
    where = key if key is not None else f"{record.section}.{record.subject}"

    def reject(reason: str) -> InvalidPolicy:
        return InvalidPolicy(where, reason)

    try:
        validate_subject(record.subject, wildcards=True)
    except InvalidName as exc:
        raise reject(f"subject: {exc.rule}") from None
    if record.version < 1:
        raise reject(f"version {record.version} is below 1")
    if not record.author or len(record.author) > MAX_AUTHOR_LENGTH:
        raise reject(f"author must have 1 to {MAX_AUTHOR_LENGTH} characters")
    if not record.author.isprintable():
        raise reject("author holds control characters")
    if len(record.reason) > MAX_REASON_LENGTH:
        raise reject(f"reason is longer than {MAX_REASON_LENGTH} characters")
    if not record.reason.isprintable():
        raise reject("reason must be one line without control characters")
    if record.time < 0:
        raise reject("time is negative")
    _validate_codec(record.value, reject)
    if key is not None and policy_key(record.subject, record.section) != key:
        raise reject(f"holds the {record.section} policy of {record.subject!r}, not this key's")
    return record


def _validate_codec(codec: CodecPolicy, reject: Callable[[str], InvalidPolicy]) -> None:
    if codec.algorithm == "zstd" and not MIN_ZSTD_LEVEL <= codec.level <= MAX_ZSTD_LEVEL:
        raise reject(f"zstd level {codec.level} is not in {MIN_ZSTD_LEVEL}..{MAX_ZSTD_LEVEL}")
    if not 0 <= codec.dictionary <= MAX_DICTIONARY_ID:
        raise reject(f"dictionary id {codec.dictionary} is not in 0..2**32-1")
    if not 0 <= codec.min_size <= MAX_MIN_SIZE:
        raise reject(f"min_size {codec.min_size} is not in 0..{MAX_MIN_SIZE}")


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(PolicyRecord)


def encode_record(record: PolicyRecord) -> bytes:
    """The stored form of ``record`` (JSON)."""
    return _encoder.encode(record)


def decode_record(data: bytes, key: str | None = None) -> PolicyRecord:
    """Decode and validate a stored record (see :func:`validate_record` for ``key``).

    Every failure, whatever the bytes, is an :class:`InvalidPolicy`.
    """
    where = key if key is not None else "?"
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidPolicy(where, f"{len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    try:
        record = _decoder.decode(data)
    except (ValueError, RecursionError) as exc:
        # msgspec.DecodeError and UnicodeDecodeError are ValueErrors; deep nesting is not.
        raise InvalidPolicy(where, f"does not decode: {exc}") from None
    return validate_record(record, key=key)


# -- the table a node holds ---------------------------------------------------------------

#: Subjects whose codec lookup a table remembers; past this the memory starts over.
CODEC_CACHE_SIZE: Final = 4096


def _pattern_rank(pattern: str) -> tuple[int, bool, str]:
    """Sort key of a wildcard pattern, most specific first."""
    tokens = pattern.split(".")
    literals = sum(1 for t in tokens if t not in ("*", ">"))
    return (-literals, tokens[-1] == ">", pattern)


def _regex(pattern: str) -> str:
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r".+")
        else:
            parts.append(re.escape(token))
    return r"\.".join(parts)


class _CodecCache(dict[str, CodecPolicy | None]):
    """subject -> codec; a miss is resolved by the table and remembered, boundedly."""

    __slots__ = ("resets", "table")

    def __init__(self, table: PolicyTable) -> None:
        super().__init__()
        self.table = table
        self.resets = 0

    def __missing__(self, subject: str) -> CodecPolicy | None:
        if len(self) >= CODEC_CACHE_SIZE:
            self.clear()
            self.resets += 1
        found = self[subject] = self.table._find_codec(subject)
        return found


class PolicyTable:
    """The policy a node holds: the last good record of every subject and section.

    The watcher feeds it (:mod:`mesh._policy_watch`); the publish path asks
    :attr:`codec_for`. Pure: no I/O, no clock.

    ``codec_for(subject)`` returns the codec policy for a publish subject, or None for the
    defaults. An exact entry wins over patterns; among matching patterns the one with more
    literal tokens wins, then one ending in ``*`` over one ending in ``>``, then the
    smaller pattern string. Answers are cached per subject (at most
    :data:`CODEC_CACHE_SIZE`, forgotten whenever the table changes), so a hit is one dict
    lookup.
    """

    codec_for: Callable[[str], CodecPolicy | None]

    def __init__(self) -> None:
        self._records: dict[str, PolicyRecord] = {}
        self._exact_codec: dict[str, CodecPolicy] = {}
        # Every codec pattern in one regex, one group each, most specific first: the
        # first alternative that matches is the one that wins.
        self._codec_regex: re.Pattern[str] | None = None
        self._codec_values: list[CodecPolicy] = []
        self._codec_stale = False  # the two above are rebuilt at the next cache miss
        self._codec_cache = _CodecCache(self)
        # The bound C method of the cache dict: nothing in Python runs on a hit.
        self.codec_for = self._codec_cache.__getitem__
        self.rejected_stale = 0
        self.rejected_malformed = 0

    @property
    def cache_resets(self) -> int:
        """How many times the codec cache filled up and started over."""
        return self._codec_cache.resets

    def get(self, subject: str, section: str) -> PolicyRecord | None:
        """The record held for ``subject`` (or pattern) and ``section``, if any."""
        return self._records.get(policy_key(subject, section))

    def apply(self, record: PolicyRecord) -> bool:
        """Hold ``record`` unless it is stale (its version is not above the one held).

        Returns False, and counts it in :attr:`rejected_stale`, for a stale record. The
        record must be valid (:func:`validate_record`).
        """
        key = policy_key(record.subject, record.section)
        held = self._records.get(key)
        if held is not None and record.version <= held.version:
            self.rejected_stale += 1
            return False
        self._records[key] = record
        self._changed(record.section)
        return True

    def remove(self, subject: str, section: str) -> bool:
        """Forget the record of ``subject`` and ``section``; False if none was held."""
        if self._records.pop(policy_key(subject, section), None) is None:
            return False
        self._changed(section)
        return True

    def versions(self) -> dict[str, int]:
        """The version held under every key."""
        return {key: record.version for key, record in self._records.items()}

    def records(self) -> list[PolicyRecord]:
        """Every record held, by key."""
        return [self._records[key] for key in sorted(self._records)]

    def __len__(self) -> int:
        return len(self._records)

    def _changed(self, section: str) -> None:
        if section == "codec":
            # Rebuilt lazily: a resync applies many records in a row.
            self._codec_stale = True
            self._codec_cache.clear()

    def _rebuild_codec(self) -> None:
        exact: dict[str, CodecPolicy] = {}
        patterns: list[tuple[tuple[int, bool, str], CodecPolicy]] = []
        for record in self._records.values():
            if not isinstance(record.value, CodecPolicy):
                continue
            tokens = record.subject.split(".")
            if "*" in tokens or ">" in tokens:
                patterns.append((_pattern_rank(record.subject), record.value))
            else:
                exact[record.subject] = record.value
        patterns.sort(key=lambda p: p[0])
        self._exact_codec = exact
        self._codec_regex = (
            re.compile("|".join(f"({_regex(rank[2])})" for rank, _ in patterns))
            if patterns
            else None
        )
        self._codec_values = [value for _, value in patterns]
        self._codec_stale = False

    def _find_codec(self, subject: str) -> CodecPolicy | None:
        if self._codec_stale:
            self._rebuild_codec()
        found = self._exact_codec.get(subject)
        if found is not None or self._codec_regex is None:
            return found
        match = self._codec_regex.fullmatch(subject)
        if match is None or match.lastindex is None:
            return None
        return self._codec_values[match.lastindex - 1]
