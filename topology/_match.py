"""NATS subject matching: which subscription patterns a concrete subject reaches.

NATS rules: subjects are ``.``-separated tokens; in a pattern ``*`` matches exactly one
token and ``>`` (only as the last token) matches one or more trailing tokens.

:func:`matches` and :func:`overlaps` compare two strings token by token; they are the
reference. :class:`PatternIndex` answers "which of these patterns match this subject"
for many patterns at once: literal patterns are a set lookup, wildcard patterns a token
trie whose walk follows the subject's literal token, ``*`` and ``>`` at each level, so
its cost depends on the subject's depth and the wildcards on the way, not on the
number of patterns.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PatternIndex", "is_wildcard", "matches", "overlaps"]


def is_wildcard(subject: str) -> bool:
    """True if ``subject`` is a pattern with a ``*`` or ``>`` token."""
    if "*" not in subject and ">" not in subject:
        return False
    return any(token in ("*", ">") for token in subject.split("."))


def overlaps(a: str, b: str) -> bool:
    """True if some concrete subject matches both patterns ``a`` and ``b``.

    With a concrete ``b`` this is "``a`` matches ``b``" (see :func:`matches`).
    """
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb, strict=False):
        if x == ">" or y == ">":
            return True  # both still have a token here, and ">" takes one or more
        if x != y and x != "*" and y != "*":
            return False
    return len(ta) == len(tb)


def matches(pattern: str, subject: str) -> bool:
    """True if the concrete ``subject`` matches the subscription ``pattern``."""
    return overlaps(pattern, subject)


class _Node:
    __slots__ = ("children", "pattern", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        #: The pattern that ends at this node, if any.
        self.pattern: str | None = None
        #: The pattern ending in ">" right below this node, if any.
        self.tail: str | None = None


class PatternIndex:
    """A set of subscription patterns, indexed by token for fast matching.

    Results of :meth:`match` are remembered per subject (``cache`` subjects at most,
    then the memory is cleared), because a graph asks about the same subject once per
    publisher.
    """

    __slots__ = ("_cache", "_cache_size", "_literal", "_patterns", "_root", "_wild")

    def __init__(self, patterns: Iterable[str] = (), *, cache: int = 65_536) -> None:
        self._root = _Node()
        self._literal: set[str] = set()
        self._wild = False
        self._cache: dict[str, tuple[str, ...]] = {}
        self._cache_size = cache
        self._patterns: set[str] = set()
        for pattern in patterns:
            self.add(pattern)

    def add(self, pattern: str) -> None:
        """Index one pattern (adding it again changes nothing)."""
        if pattern in self._patterns:
            return
        self._patterns.add(pattern)
        self._cache.clear()
        if not is_wildcard(pattern):
            self._literal.add(pattern)
            return
        self._wild = True
        tokens = pattern.split(".")
        node = self._root
        for token in tokens[:-1]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            node = child
        if tokens[-1] == ">":
            node.tail = pattern
            return
        child = node.children.get(tokens[-1])
        if child is None:
            child = node.children[tokens[-1]] = _Node()
        child.pattern = pattern

    def match(self, subject: str) -> tuple[str, ...]:
        """The indexed patterns that match the concrete ``subject``, sorted."""
        found = self._cache.get(subject)
        if found is not None:
            return found
        found = (subject,) if subject in self._literal else ()
        if self._wild:
            found = self._walk(subject, found)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[subject] = found
        return found

    def _walk(self, subject: str, literal: tuple[str, ...]) -> tuple[str, ...]:
        """``literal`` and the wildcard patterns that match ``subject``, sorted."""
        tokens = subject.split(".")
        last = len(tokens)
        result = list(literal)
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == last:
                if node.pattern is not None:
                    result.append(node.pattern)
                continue
            if node.tail is not None:
                result.append(node.tail)
            children = node.children
            if not children:
                continue
            child = children.get(tokens[depth])
            if child is not None:
                stack.append((child, depth + 1))
            star = children.get("*")
            if star is not None and star is not child:
                stack.append((star, depth + 1))
        return tuple(sorted(result)) if len(result) > 1 else tuple(result)
