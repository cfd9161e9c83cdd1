"""Validation of subjects, queue groups and agent names.

Names are checked before any subject is built or anything is sent, so a bad
name fails on the caller's side with the rule it broke, never as a protocol
error (or a CRLF injection) on the wire. Valid subjects are remembered in a
small bounded cache: the publish path validates each distinct subject once.
"""

from __future__ import annotations

import re

from mesh._errors import InvalidName

MAX_SUBJECT_LENGTH = 256
MAX_NAME_LENGTH = 64
INTERNAL_PREFIX = "_MESH."

_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# A token may hold any printable non-space ASCII except the separator and wildcards.
_TOKEN = re.compile(r"[!-~]+")
_RESERVED_PREFIXES = ("$", "_INBOX.", "_INBOX", INTERNAL_PREFIX)

_CACHE_SIZE = 4096
_valid_publish: set[str] = set()
_valid_subscribe: set[str] = set()


def validate_agent_name(name: str) -> str:
    """Return ``name`` if it is a valid agent name, else raise :class:`InvalidName`.

    Agent names become queue groups, registry keys and NATS micro service names,
    so they follow the strictest of those rules: ASCII letters, digits, ``-`` and
    ``_``, starting with a letter or digit, at most 64 characters.
    """
    return _check_name("agent name", name)


def validate_instance(instance: str) -> str:
    """Return ``instance`` if it is a valid instance id, else raise :class:`InvalidName`.

    An instance id is the last token of the subjects built for one running node
    (``_MESH.telemetry.<id>``, ``_MESH.policy.applied.<id>``, ``$SRV.PING.<name>.<id>``)
    and of its registry key, so it follows the agent name rules: one token, no
    wildcards, nothing a subject or a key cannot hold.
    """
    return _check_name("instance id", instance)


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName(kind, str(name), "must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(kind, name, f"longer than {MAX_NAME_LENGTH} characters")
    if not _AGENT_NAME.fullmatch(name):
        raise InvalidName(
            kind,
            name,
            "use only ASCII letters, digits, '-' and '_', starting with a letter or digit",
        )
    return name


def validate_subject(subject: str, *, wildcards: bool = False, internal: bool = False) -> str:
    """Return ``subject`` if it is valid, else raise :class:`InvalidName`.

    Rules: dot-separated non-empty tokens of printable ASCII with no whitespace
    or control characters; at most 256 characters; ``*`` and ``>`` only as whole
    tokens, ``>`` only last, and only when ``wildcards`` is true (subscribing);
    no ``$``, ``_INBOX`` or ``_MESH.`` prefix unless ``internal`` is true.
    """
    cache = _valid_subscribe if wildcards else _valid_publish
    try:
        if subject in cache and not internal:
            return subject
    except TypeError:  # unhashable, so not a string: refused below with the rule
        pass
    _check_subject(subject, wildcards=wildcards, internal=internal)
    if not internal:
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache.add(subject)
    return subject


def _check_subject(subject: str, *, wildcards: bool, internal: bool) -> None:
    kind = "subject pattern" if wildcards else "subject"
    if not isinstance(subject, str) or not subject:
        raise InvalidName(kind, str(subject), "must be a non-empty string")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidName(kind, subject, f"longer than {MAX_SUBJECT_LENGTH} characters")
    if not internal:
        for prefix in _RESERVED_PREFIXES:
            if subject.startswith(prefix):
                raise InvalidName(
                    kind, subject, f"the prefix {prefix!r} is reserved for NATS and the mesh"
                )
    tokens = subject.split(".")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if not token:
            raise InvalidName(kind, subject, "empty token (leading, trailing or double '.')")
        if token in ("*", ">"):
            if not wildcards:
                raise InvalidName(
                    kind, subject, f"wildcard {token!r} is only allowed when subscribing"
                )
            if token == ">" and i != last:
                raise InvalidName(kind, subject, "'>' is only allowed as the last token")
            continue
        if not _TOKEN.fullmatch(token):
            raise InvalidName(
                kind, subject, "only printable ASCII without spaces, tabs, CR or LF is allowed"
            )
        if "*" in token or ">" in token:
            raise InvalidName(kind, subject, "'*' and '>' must be whole tokens")


def validate_queue_group(queue: str) -> str:
    """Return ``queue`` if it is a valid queue group name (an agent name or empty)."""
    if isinstance(queue, str) and not queue:
        return queue
    return _check_name("queue group", queue)
