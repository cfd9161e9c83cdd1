"""Subject matching: the trie index and the pairwise checks against a brute-force
reference (patterns turned into regular expressions, overlaps found by enumeration)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topology._match import PatternIndex, is_wildcard, matches, overlaps

TOKENS = ["a", "b", "c"]


def regex(pattern: str) -> re.Pattern[str]:
    """NATS rules as a regular expression: ``*`` one token, ``>`` one or more at the end."""
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(token))
    return re.compile(r"\.".join(parts))


def brute_matches(pattern: str, subject: str) -> bool:
    return regex(pattern).fullmatch(subject) is not None


def brute_overlaps(a: str, b: str) -> bool:
    """Some subject of up to one more token than the longer pattern, over the tokens
    they use plus a fresh one, matches both."""
    alphabet = sorted({t for t in (*a.split("."), *b.split(".")) if t not in "*>"} | {"z"})
    longest = max(a.count("."), b.count(".")) + 2
    for n in range(1, longest + 1):
        for tokens in itertools.product(alphabet, repeat=n):
            subject = ".".join(tokens)
            if brute_matches(a, subject) and brute_matches(b, subject):
                return True
    return False


literal = st.sampled_from(TOKENS)
subjects = st.lists(literal, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.sampled_from([*TOKENS, "*"]), min_size=1, max_size=4))
    if draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("*.b.>", "x.b.c.d", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_matches(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected
    assert (pattern in PatternIndex([pattern]).match(subject)) is expected


def test_is_wildcard() -> None:
    assert is_wildcard("a.*")
    assert is_wildcard("a.>")
    assert is_wildcard(">")
    assert not is_wildcard("a.b")
    assert not is_wildcard("a*.b>")


@settings(max_examples=300, deadline=None)
@given(st.lists(patterns(), max_size=25), st.lists(subjects, min_size=1, max_size=10))
def test_index_agrees_with_brute_force(pats: list[str], subs: list[str]) -> None:
    index = PatternIndex(pats)
    for subject in subs:
        expected = tuple(sorted({p for p in pats if brute_matches(p, subject)}))
        assert index.match(subject) == expected
        assert index.match(subject) == expected  # the cached answer too


@settings(max_examples=300, deadline=None)
@given(patterns(), patterns())
def test_overlaps_agrees_with_brute_force(a: str, b: str) -> None:
    assert overlaps(a, b) is brute_overlaps(a, b)
    assert overlaps(a, b) is overlaps(b, a)


def test_index_cache_is_bounded_and_forgets_on_add() -> None:
    index = PatternIndex(["a.*"], cache=2)
    for subject in ("a.b", "a.c", "a.d"):
        assert index.match(subject) == ("a.*",)
    index.add("a.d")
    assert index.match("a.d") == ("a.*", "a.d")
