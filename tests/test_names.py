"""Subject, queue group and agent name validation (pure, no server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import _names
from mesh._errors import InvalidName, MeshError
from mesh._names import (
    MAX_NAME_LENGTH,
    MAX_SUBJECT_LENGTH,
    validate_agent_name,
    validate_instance,
    validate_queue_group,
    validate_subject,
)

# ------------------------------------------------------------------ subjects

VALID_BOTH = [
    "tasks",
    "tasks.summarize",
    "events.research.done",
    "a.b.c.d.e.f",
    "Tasks-1_x.y",
    "a!#%&'()+,-/:;<=?@[]^`{|}~.b",
    "x" * MAX_SUBJECT_LENGTH,
    "_MESHY.x",  # only the exact "_MESH." prefix is reserved
    "MESH.x",
    "a.$b",  # '$' is reserved as a prefix, not inside
]


@pytest.mark.parametrize("subject", VALID_BOTH)
def test_valid_subjects_publish_and_subscribe(subject: str) -> None:
    assert validate_subject(subject) == subject
    assert validate_subject(subject, wildcards=True) == subject


@pytest.mark.parametrize("subject", ["*", ">", "tasks.*", "tasks.>", "*.b.>", "a.*.c", "*.*"])
def test_wildcards_only_when_subscribing(subject: str) -> None:
    assert validate_subject(subject, wildcards=True) == subject
    with pytest.raises(InvalidName) as info:
        validate_subject(subject)
    assert "only allowed when subscribing" in info.value.rule


@pytest.mark.parametrize("subject", ["a.>.b", ">.a", "a.>.>"])
def test_full_wildcard_only_last(subject: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_subject(subject, wildcards=True)
    assert "last token" in info.value.rule


@pytest.mark.parametrize("subject", ["a*", "a.b*", "*a.b", "a.>b", "a.b>", "a.*>"])
def test_wildcard_chars_must_be_whole_tokens(subject: str) -> None:
    for wildcards in (False, True):
        with pytest.raises(InvalidName) as info:
            validate_subject(subject, wildcards=wildcards)
        assert "whole tokens" in info.value.rule


@pytest.mark.parametrize("subject", [".a", "a.", "a..b", ".", "..", "a.b."])
def test_empty_tokens(subject: str) -> None:
    for wildcards in (False, True):
        with pytest.raises(InvalidName) as info:
            validate_subject(subject, wildcards=wildcards)
        assert "empty token" in info.value.rule


@pytest.mark.parametrize(
    "subject",
    [
        "a b",
        " a",
        "a ",
        "a\tb",
        "a\rb",
        "a\nb",
        "a\r\nPUB x 1",  # a protocol injection attempt
        "tasks.sum\x00",
        "tasks.\x7f",
        "a.\x0b",
        "tâches.x",
        "tasks.😀",
        "a\u00a0b",  # non-breaking space
        "a\u2028b",  # Unicode line separator
    ],
)
def test_whitespace_controls_and_non_ascii(subject: str) -> None:
    for wildcards in (False, True):
        with pytest.raises(InvalidName) as info:
            validate_subject(subject, wildcards=wildcards)
        assert "printable ASCII" in info.value.rule


@pytest.mark.parametrize(
    ("subject", "prefix"),
    [
        ("$SRV.PING", "$"),
        ("$JS.API.INFO", "$"),
        ("$", "$"),
        ("_INBOX.abc", "_INBOX."),
        ("_INBOX", "_INBOX"),
        ("_MESH.telemetry", "_MESH."),
        ("_MESH.>", "_MESH."),
    ],
)
def test_reserved_prefixes(subject: str, prefix: str) -> None:
    for wildcards in (False, True):
        with pytest.raises(InvalidName) as info:
            validate_subject(subject, wildcards=wildcards)
        assert repr(prefix) in info.value.rule
        assert "reserved" in info.value.rule


@pytest.mark.parametrize("subject", ["$SRV.PING", "_INBOX.x", "_MESH.telemetry.node"])
def test_internal_subjects_allowed_when_internal(subject: str) -> None:
    assert validate_subject(subject, internal=True) == subject
    assert validate_subject(subject + ".>", wildcards=True, internal=True) == subject + ".>"


def test_internal_subjects_still_follow_the_other_rules() -> None:
    for bad in ("_MESH..x", "_MESH.a b", "$SRV.*", "_MESH." + "x" * MAX_SUBJECT_LENGTH):
        with pytest.raises(InvalidName):
            validate_subject(bad, internal=True)


def test_length_bound() -> None:
    assert validate_subject("a" * MAX_SUBJECT_LENGTH)
    long = "a." * (MAX_SUBJECT_LENGTH // 2) + "a"
    for subject in ("a" * (MAX_SUBJECT_LENGTH + 1), long):
        with pytest.raises(InvalidName) as info:
            validate_subject(subject)
        assert str(MAX_SUBJECT_LENGTH) in info.value.rule


@pytest.mark.parametrize("subject", ["", None, 42, b"tasks"])
def test_not_a_non_empty_string(subject: object) -> None:
    with pytest.raises(InvalidName) as info:
        validate_subject(subject)  # type: ignore[arg-type]
    assert "non-empty string" in info.value.rule


def test_error_carries_kind_name_and_rule() -> None:
    with pytest.raises(InvalidName) as info:
        validate_subject("tasks.>")
    err = info.value
    assert isinstance(err, MeshError)
    assert isinstance(err, ValueError)
    assert err.kind == "subject"
    assert err.name == "tasks.>"
    assert err.rule in str(err)
    assert "'tasks.>'" in str(err)
    with pytest.raises(InvalidName) as info:
        validate_subject("a.>.b", wildcards=True)
    assert info.value.kind == "subject pattern"


# ------------------------------------------------------------------ the cache


def test_cache_is_never_poisoned_by_a_bad_subject() -> None:
    bad = "poison.a b"
    for _ in range(3):
        with pytest.raises(InvalidName):
            validate_subject(bad)
    assert bad not in _names._valid_publish
    assert bad not in _names._valid_subscribe


def test_cache_keeps_publish_and_subscribe_apart() -> None:
    # A pattern accepted for subscribing must not then pass as a publish subject.
    assert validate_subject("cache.sep.>", wildcards=True)
    with pytest.raises(InvalidName):
        validate_subject("cache.sep.>")
    assert "cache.sep.>" not in _names._valid_publish


def test_internal_subjects_are_not_cached_for_user_use() -> None:
    assert validate_subject("_MESH.cache.x", internal=True)
    with pytest.raises(InvalidName):
        validate_subject("_MESH.cache.x")


def test_cache_is_bounded() -> None:
    for i in range(_names._CACHE_SIZE + 10):
        validate_subject(f"bound.{i}")
    assert len(_names._valid_publish) <= _names._CACHE_SIZE
    assert validate_subject("bound.0") == "bound.0"


# ------------------------------------------------------------------ agent names


@pytest.mark.parametrize(
    "name", ["echo", "a", "0", "Echo-2", "research_agent", "a" * MAX_NAME_LENGTH, "9x_-"]
)
def test_valid_agent_names(name: str) -> None:
    assert validate_agent_name(name) == name
    assert validate_queue_group(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "-echo",
        "_echo",
        "echo.x",
        "echo x",
        "echo*",
        "echo>",
        "écho",
        "echo\n",
        "echo\t",
        "$echo",
        "a/b",
    ],
)
def test_invalid_agent_name_charset(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_agent_name(name)
    assert info.value.kind == "agent name"
    assert "ASCII letters, digits" in info.value.rule
    with pytest.raises(InvalidName):
        validate_queue_group(name)


def test_agent_name_length() -> None:
    with pytest.raises(InvalidName) as info:
        validate_agent_name("a" * (MAX_NAME_LENGTH + 1))
    assert str(MAX_NAME_LENGTH) in info.value.rule


@pytest.mark.parametrize("name", ["", None, 7])
def test_agent_name_must_be_a_string(name: object) -> None:
    with pytest.raises(InvalidName) as info:
        validate_agent_name(name)  # type: ignore[arg-type]
    assert "non-empty string" in info.value.rule


def test_empty_queue_group_means_none() -> None:
    assert validate_queue_group("") == ""


# ------------------------------------------------------------------ properties

_TOKEN = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=".*>"),
    min_size=1,
    max_size=8,
)


@given(
    prefix=st.text(max_size=20),
    bad=st.sampled_from([" ", "\r", "\n", "\t"]),
    suffix=st.text(max_size=20),
    wildcards=st.booleans(),
    internal=st.booleans(),
)
def test_any_whitespace_is_rejected(
    prefix: str, bad: str, suffix: str, wildcards: bool, internal: bool
) -> None:
    subject = prefix + bad + suffix
    with pytest.raises(InvalidName):
        validate_subject(subject, wildcards=wildcards, internal=internal)
    # Twice: a rejected subject is never remembered as valid.
    with pytest.raises(InvalidName):
        validate_subject(subject, wildcards=wildcards, internal=internal)
    with pytest.raises(InvalidName):
        validate_agent_name(subject)


@given(st.lists(_TOKEN, min_size=1, max_size=6))
def test_dotted_printable_tokens_are_valid(tokens: list[str]) -> None:
    subject = ".".join(tokens)
    if len(subject) > MAX_SUBJECT_LENGTH or subject.startswith(("$", "_INBOX", "_MESH.")):
        return
    assert validate_subject(subject) == subject
    assert validate_subject(subject, wildcards=True) == subject


@given(st.text(max_size=40), st.booleans())
def test_validation_is_total(subject: str, wildcards: bool) -> None:
    """Any string is accepted or rejected with InvalidName; nothing else escapes."""
    try:
        ok = validate_subject(subject, wildcards=wildcards)
    except InvalidName as exc:
        rule = exc.rule
        assert rule
        return
    assert ok == subject
    assert subject.isascii()
    assert subject.isprintable()
    assert " " not in subject


# ------------------------------------------------------------------ hostile values


@pytest.mark.parametrize(
    "subject", [["tasks"], {"tasks": 1}, {"tasks"}, bytearray(b"tasks"), 3.5, object()]
)
def test_any_non_string_is_invalid_name_even_unhashable(subject: object) -> None:
    for wildcards in (False, True):
        with pytest.raises(InvalidName) as info:
            validate_subject(subject, wildcards=wildcards)  # type: ignore[arg-type]
        assert "non-empty string" in info.value.rule


@pytest.mark.parametrize("queue", [None, 0, [], ["q"], b"q", "bad queue", "q.x", "*"])
def test_queue_group_must_be_an_agent_name_or_empty_string(queue: object) -> None:
    with pytest.raises(InvalidName) as info:
        validate_queue_group(queue)  # type: ignore[arg-type]
    assert info.value.kind == "queue group"


@pytest.mark.parametrize("instance", ["0a1b2c3d4e5f6a7b8c9d0e", "sender-1", "n_2"])
def test_valid_instance_ids(instance: str) -> None:
    assert validate_instance(instance) == instance


@pytest.mark.parametrize(
    "instance", ["", "a.b", "*", ">", "a b", "a\r\nPUB x 1", "$x", "-x", "x" * 65, None, 7]
)
def test_invalid_instance_ids(instance: object) -> None:
    with pytest.raises(InvalidName) as info:
        validate_instance(instance)  # type: ignore[arg-type]
    assert info.value.kind == "instance id"


_ANY_VALUE = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=20),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@given(_ANY_VALUE, st.booleans(), st.booleans())
def test_every_validator_is_total_over_any_value(
    value: object, wildcards: bool, internal: bool
) -> None:
    """Whatever the value, a validator returns it or raises InvalidName: nothing else."""
    calls = [
        lambda: validate_subject(value, wildcards=wildcards, internal=internal),  # type: ignore[arg-type]
        lambda: validate_agent_name(value),  # type: ignore[arg-type]
        lambda: validate_queue_group(value),  # type: ignore[arg-type]
        lambda: validate_instance(value),  # type: ignore[arg-type]
    ]
    for call in calls:
        try:
            assert call() == value
        except InvalidName as exc:
            rule = exc.rule
            assert rule
