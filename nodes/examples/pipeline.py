"""A small multi-agent pipeline: a planner fans a topic out to researchers, a writer
assembles their findings into a report.

Flow of one task::

    client ──request demo.plan (Task)──▶ planner
        planner ──request demo.research (ResearchQuery) ×N, concurrently──▶ researcher (replicas)
        planner ──request demo.write (WriteRequest with N Findings)──▶ writer
        planner ──publish demo.events.done (TaskDone), fire-and-forget
    planner ──reply (Report)──▶ client

Subjects:

- ``demo.plan`` (planner): takes a :class:`Task`, replies with a :class:`Report`.
- ``demo.research`` (researcher): takes a :class:`ResearchQuery`, replies with a
  :class:`Finding` after 5–25 ms of simulated work. Run several replicas: they share the
  requests through the ``researcher`` queue group.
- ``demo.write`` (writer): takes a :class:`WriteRequest`, replies with a :class:`Report`.
- ``demo.events.done``: a :class:`TaskDone` event per finished task.

Everything is deterministic: delays and texts derive from a hash of the question, so
the same task always gives the same report. No model or network is called.

Run each agent as its own process (or all of them with ``mesh up --demo``)::

    mesh node run nodes.examples.pipeline:planner
    mesh node run nodes.examples.pipeline:researcher     # as many replicas as you like
    mesh node run nodes.examples.pipeline:writer
    mesh request demo.plan '{"id": "t1", "topic": "solid-state batteries"}'
    mesh sub 'demo.events.>'
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Coroutine, Iterable
from typing import Annotated, Any, Final, TypeVar

import msgspec

from nodes import Context, Node

__all__ = [
    "Finding",
    "Report",
    "ResearchQuery",
    "Section",
    "Source",
    "Task",
    "TaskDone",
    "WriteRequest",
    "planner",
    "researcher",
    "writer",
]

T = TypeVar("T")

MAX_QUESTIONS: Final = 8
#: Seconds a planner waits for one research or write step (capped by its caller's deadline).
STEP_TIMEOUT: Final = 5.0


# ------------------------------------------------------------------- messages


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """A research task: a topic to cover with ``questions`` research questions."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    topic: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    questions: Annotated[int, msgspec.Meta(ge=1, le=MAX_QUESTIONS)] = 3


class ResearchQuery(msgspec.Struct, frozen=True, kw_only=True):
    """One question of a task, for a researcher."""

    task_id: str
    question: str
    index: int


class Source(msgspec.Struct, frozen=True, kw_only=True):
    """A (fictional) reference a finding is based on."""

    title: str
    url: str
    publisher: str
    year: int


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """A researcher's answer to one question."""

    question: str
    index: int
    summary: str
    sources: list[Source]
    confidence: float


class WriteRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The findings of a task, for the writer."""

    task_id: str
    topic: str
    findings: list[Finding]


class Section(msgspec.Struct, frozen=True, kw_only=True):
    """One section of a report and the sources it cites."""

    heading: str
    body: str
    citations: list[int]  # indexes into Report.sources


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """The finished report of a task."""

    task_id: str
    title: str
    sections: list[Section]
    word_count: int
    sources: list[Source]
    keywords: list[str]


class TaskDone(msgspec.Struct, frozen=True, kw_only=True):
    """Published on ``demo.events.done`` when a task's report is ready."""

    task_id: str
    title: str
    sections: int
    word_count: int
    sources: int


planner = Node("planner", description="Splits a topic into questions and orchestrates a report")
researcher = Node("researcher", description="Answers one research question (simulated)")
writer = Node("writer", description="Assembles findings into a report")


# ------------------------------------------------------------------- planner

_QUESTIONS: Final = (
    "What is the current state of {topic}?",
    "Which open problems still limit {topic}?",
    "What does the published evidence say about the costs of {topic}?",
    "Who are the main groups working on {topic}, and how do their approaches differ?",
    "What risks and failure modes have been reported for {topic}?",
    "How is {topic} regulated or standardised today?",
    "Which measurements would show real progress in {topic}?",
    "What is expected to change in {topic} over the next five years?",
)


def plan_questions(task: Task) -> list[str]:
    """The research questions for ``task``, always the same for the same task."""
    return [_QUESTIONS[i].format(topic=task.topic) for i in range(task.questions)]


@planner.handles("demo.plan", timeout=20.0)
async def plan(task: Task, ctx: Context) -> Report:
    questions = plan_questions(task)
    findings = await _all(
        ctx.request(
            "demo.research",
            ResearchQuery(task_id=task.id, question=question, index=i),
            type=Finding,
            timeout=STEP_TIMEOUT,
        )
        for i, question in enumerate(questions)
    )
    report: Report = await ctx.request(
        "demo.write",
        WriteRequest(task_id=task.id, topic=task.topic, findings=findings),
        type=Report,
        timeout=STEP_TIMEOUT,
    )
    await ctx.publish(
        "demo.events.done",
        TaskDone(
            task_id=task.id,
            title=report.title,
            sections=len(report.sections),
            word_count=report.word_count,
            sources=len(report.sources),
        ),
    )
    return report


async def _all(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; on the first failure cancel the rest and raise it."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                tasks.append(group.create_task(coro))
    except ExceptionGroup as failed:
        # The handler's caller gets the root cause (e.g. RequestTimeout), not a group.
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


# ------------------------------------------------------------------- researcher

# Vocabulary of the generated summaries (split once, at import).
_WORD_TEXT: Final = (
    "adoption analysis baseline benchmark capacity constraint cost coverage dataset "
    "deployment design efficiency estimate evidence experiment framework growth impact "
    "incentive infrastructure latency market measurement method model outcome pilot "
    "policy prototype quality reliability replication review risk scale signal "
    "standard study supply survey throughput trade-off trial uncertainty variance yield"
)
_WORDS: Final = tuple(_WORD_TEXT.split())
_OPENERS: Final = (
    "Recent work suggests that",
    "Several independent studies report that",
    "The strongest evidence indicates that",
    "Practitioners consistently note that",
    "A 2023 review concluded that",
    "Field data shows that",
)
_VERBS: Final = (
    "improves",
    "constrains",
    "depends on",
    "outpaces",
    "reshapes",
    "lags behind",
    "correlates with",
    "reduces",
)
_PUBLISHERS: Final = (
    "Journal of Applied Systems",
    "Open Research Review",
    "Institute for Technology Studies",
    "Annual Survey of Engineering",
    "Policy Lab Working Papers",
    "Proceedings of the Measurement Society",
)


class _Stream:
    """Deterministic bytes derived from a text: the researcher's only source of variety."""

    def __init__(self, text: str) -> None:
        self._data = hashlib.shake_256(text.encode()).digest(512)
        self._pos = 0

    def byte(self) -> int:
        value = self._data[self._pos % len(self._data)]
        self._pos += 1
        return value

    def pick(self, options: tuple[str, ...]) -> str:
        return options[self.byte() % len(options)]


def research_delay(question: str) -> float:
    """Seconds of simulated work for ``question``: 5–25 ms, from its hash."""
    return (5 + _Stream(question).byte() % 21) / 1000


def find(query: ResearchQuery) -> Finding:
    """The finding for ``query``, computed from the question alone."""
    stream = _Stream(query.question)
    stream.byte()  # the first byte sets the delay
    sentences = []
    for _ in range(2 + stream.byte() % 3):
        subject = " ".join(stream.pick(_WORDS) for _ in range(2))
        obj = " ".join(stream.pick(_WORDS) for _ in range(2))
        sentences.append(
            f"{stream.pick(_OPENERS)} {subject} {stream.pick(_VERBS)} {obj} "
            f"by roughly {5 + stream.byte() % 60}% across the {stream.pick(_WORDS)} "
            f"and {stream.pick(_WORDS)} measured so far."
        )
    sources = []
    for _ in range(2 + stream.byte() % 3):
        words = [stream.pick(_WORDS) for _ in range(3)]
        slug = "-".join(words)
        sources.append(
            Source(
                title=f"{words[0].capitalize()} and {words[1]}: a {words[2]} perspective",
                url=f"https://example.org/{stream.pick(_WORDS)}/{slug}-{stream.byte():02x}",
                publisher=stream.pick(_PUBLISHERS),
                year=2015 + stream.byte() % 10,
            )
        )
    return Finding(
        question=query.question,
        index=query.index,
        summary=" ".join(sentences),
        sources=sources,
        confidence=round(0.5 + (stream.byte() % 50) / 100, 2),
    )


@researcher.handles("demo.research")
async def research(query: ResearchQuery) -> Finding:
    await asyncio.sleep(research_delay(query.question))
    return find(query)


# ------------------------------------------------------------------- writer

_VOCABULARY: Final = frozenset(_WORDS)


@writer.handles("demo.write")
async def write(request: WriteRequest) -> Report:
    return compose(request)


def _label(confidence: float) -> str:
    return "high" if confidence >= 0.8 else "medium" if confidence >= 0.6 else "low"


def compose(request: WriteRequest) -> Report:
    """Assemble the report: sources deduplicated, one section per finding, key terms."""
    findings = sorted(request.findings, key=lambda f: f.index)
    sources: list[Source] = []
    by_url: dict[str, int] = {}
    sections = []
    for finding in findings:
        citations = []
        for source in finding.sources:
            if source.url not in by_url:
                by_url[source.url] = len(sources)
                sources.append(source)
            citations.append(by_url[source.url])
        body = f"{finding.summary} Confidence: {_label(finding.confidence)}. " + " ".join(
            f"[{n + 1}]" for n in citations
        )
        sections.append(
            Section(heading=finding.question.rstrip("?"), body=body, citations=citations)
        )
    # Key terms: the most frequent vocabulary words (ties in alphabetical order).
    terms = Counter(
        word for finding in findings for word in finding.summary.split() if word in _VOCABULARY
    )
    keywords = [word for word, _ in sorted(terms.items(), key=lambda kv: (-kv[1], kv[0]))[:5]]
    summary = Section(
        heading="Summary",
        body=(
            f"This report on {request.topic} draws on {len(findings)} research questions and "
            f"{len(sources)} sources. Recurring themes: {', '.join(keywords)}."
        ),
        citations=[],
    )
    sections.insert(0, summary)
    return Report(
        task_id=request.task_id,
        title=f"{request.topic[:1].upper()}{request.topic[1:]}: findings and open questions",
        sections=sections,
        word_count=sum(len(s.heading.split()) + len(s.body.split()) for s in sections),
        sources=sources,
        keywords=keywords,
    )
