"""`mesh bench codec`: compression ratio and CPU per message on the demo's traffic.

The corpus is built by the demo pipeline's own code (:mod:`nodes.examples.pipeline`):
for each task, the planner's request, the research queries and their findings, the
write request, the writer's report, the done event and the planner's reply, each
JSON-encoded as the client sends it and framed with :func:`~mesh._wire.encode_frame`
(so ratios include the envelope). ``mesh up --demo`` cycles twelve fixed topics; here
every task gets one of 512 topics drawn from ``seed``, and the dictionary is trained
on tasks about the other half of the topics, so it never holds a measured message
verbatim.

CPU time is :func:`time.process_time_ns` over repeated passes: encode is policy
compression plus envelope and frame; decode is frame split plus decompression.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Final

import msgspec

from mesh._codec import CodecEngine
from mesh._dictionaries import train
from mesh._policy import DEFAULT_MIN_SIZE, CodecPolicy
from mesh._wire import Codec, ContentType, Envelope, Kind, decode_frame, encode_frame
from nodes.examples.pipeline import (
    ResearchQuery,
    Task,
    TaskDone,
    WriteRequest,
    compose,
    find,
    plan_questions,
)

DICTIONARY_SIZE: Final = 64 * 1024
#: Seconds of CPU each case is measured for at least (whole passes over the corpus).
MIN_CPU_SECONDS: Final = 0.3
MAX_PASSES: Final = 200

_SUBJECTS: Final = ("satellite", "battery", "grid", "reef", "reactor", "vaccine", "chip", "farm")
_ASPECTS: Final = (
    "storage",
    "recycling",
    "resilience",
    "financing",
    "supply chains",
    "safety testing",
    "maintenance",
    "regulation",
)
_PLACES: Final = (
    "",
    " in coastal cities",
    " for rural clinics",
    " in Europe",
    " at scale",
    " in the tropics",
    " after 2030",
    " for small firms",
)
_encode_json = msgspec.json.Encoder().encode


class Payload(msgspec.Struct, frozen=True, kw_only=True):
    """One message of the corpus: its subject, kind, sender, type name and body."""

    subject: str
    kind: Kind
    sender: str
    type: str
    body: bytes


class TypeSize(msgspec.Struct, frozen=True, kw_only=True):
    """How many messages of one payload type the corpus holds, and their median size."""

    type: str
    count: int
    median: int


class CodecBenchRow(msgspec.Struct, frozen=True, kw_only=True):
    """One codec option: frame bytes raw and on the wire, the share compressed, CPU."""

    name: str
    raw_bytes: int
    wire_bytes: int
    compressed: int
    encode_us: float
    decode_us: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 0.0


class CodecBenchResult(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `mesh bench codec` measured."""

    messages: int
    seed: int
    min_size: int
    median: int
    p90: int
    below_min_size: int
    types: list[TypeSize]
    dictionary_bytes: int
    training_messages: int
    training_cpu_s: float
    rows: list[CodecBenchRow]


def demo_corpus(messages: int, seed: int, *, training: bool = False) -> list[Payload]:
    """``messages`` payloads of whole demo tasks (the last task may be cut short).

    The topics are split in two halves by ``seed``: the measured corpus draws from one,
    the ``training`` corpus from the other, so no finding appears in both.
    """
    topics = [f"{s} {a}{p}" for s in _SUBJECTS for a in _ASPECTS for p in _PLACES]
    random.Random(seed).shuffle(topics)
    half = len(topics) // 2
    topics = topics[half:] if training else topics[:half]
    rng = random.Random(seed * 2 + training)
    prefix = "train" if training else "bench"
    corpus: list[Payload] = []
    n = 0
    while len(corpus) < messages:
        task = Task(id=f"{prefix}-{seed}-{n}", topic=rng.choice(topics))
        corpus.extend(_task_traffic(task))
        n += 1
    return corpus[:messages]


def _task_traffic(task: Task) -> list[Payload]:
    """What one demo task puts on the wire, in order (see the pipeline's docstring)."""
    queries = [
        ResearchQuery(task_id=task.id, question=question, index=i)
        for i, question in enumerate(plan_questions(task))
    ]
    findings = [find(query) for query in queries]
    write = WriteRequest(task_id=task.id, topic=task.topic, findings=findings)
    report = compose(write)
    done = TaskDone(
        task_id=task.id,
        title=report.title,
        sections=len(report.sections),
        word_count=report.word_count,
        sources=len(report.sources),
    )

    def payload(subject: str, kind: Kind, sender: str, value: msgspec.Struct) -> Payload:
        body = _encode_json(value)
        return Payload(
            subject=subject, kind=kind, sender=sender, type=type(value).__name__, body=body
        )

    return [
        payload("demo.plan", Kind.REQUEST, "mesh-up", task),
        *(payload("demo.research", Kind.REQUEST, "planner", q) for q in queries),
        *(payload("_INBOX.reply", Kind.REPLY, "researcher", f) for f in findings),
        payload("demo.write", Kind.REQUEST, "planner", write),
        payload("_INBOX.reply", Kind.REPLY, "writer", report),
        payload("demo.events.done", Kind.EVENT, "planner", done),
        payload("_INBOX.reply", Kind.REPLY, "planner", report),
    ]


def run_codec_bench(
    messages: int = 2000, seed: int = 0, *, min_cpu_seconds: float = MIN_CPU_SECONDS
) -> CodecBenchResult:
    """Measure every codec option on ``messages`` demo payloads, each for at least
    ``min_cpu_seconds`` of CPU (0: one pass)."""
    if messages < 1:
        raise ValueError(f"messages must be at least 1, not {messages}")
    corpus = demo_corpus(messages, seed)
    training = demo_corpus(max(messages, 1000), seed, training=True)
    started = time.process_time_ns()
    dictionary = train([p.body for p in training], size=DICTIONARY_SIZE, subject="demo.>")
    training_cpu = (time.process_time_ns() - started) / 1e9
    probe = CodecEngine()
    dictionary_id = probe.add_dictionary(dictionary)
    cases = (
        ("none", CodecPolicy()),
        ("zstd:1", CodecPolicy(algorithm="zstd", level=1)),
        ("zstd:3", CodecPolicy(algorithm="zstd", level=3)),
        ("zstd:3+dict", CodecPolicy(algorithm="zstd", level=3, dictionary=dictionary_id)),
        ("zstd:9+dict", CodecPolicy(algorithm="zstd", level=9, dictionary=dictionary_id)),
    )
    rows = [_measure(name, policy, corpus, dictionary, min_cpu_seconds) for name, policy in cases]
    sizes = sorted(len(p.body) for p in corpus)
    by_type: dict[str, list[int]] = {}
    for p in corpus:
        by_type.setdefault(p.type, []).append(len(p.body))
    return CodecBenchResult(
        messages=len(corpus),
        seed=seed,
        min_size=DEFAULT_MIN_SIZE,
        median=int(statistics.median(sizes)),
        p90=sizes[min(len(sizes) - 1, int(len(sizes) * 0.9))],
        below_min_size=sum(1 for s in sizes if s < DEFAULT_MIN_SIZE),
        types=[
            TypeSize(type=name, count=len(found), median=int(statistics.median(found)))
            for name, found in sorted(by_type.items(), key=lambda kv: statistics.median(kv[1]))
        ],
        dictionary_bytes=len(dictionary),
        training_messages=len(training),
        training_cpu_s=training_cpu,
        rows=rows,
    )


def _measure(
    name: str,
    policy: CodecPolicy,
    corpus: list[Payload],
    dictionary: bytes,
    min_cpu_seconds: float,
) -> CodecBenchRow:
    engine = CodecEngine()
    engine.add_dictionary(dictionary)
    # Envelopes are built per message, as the client does; only the codec fields vary.
    heads = [
        (
            f"{i:022x}",
            p.sender,
            p.kind,
            1_700_000_000_000_000_000 + i,
            1_700_000_005_000_000_000 + i if p.kind is Kind.REQUEST else 0,
        )
        for i, p in enumerate(corpus)
    ]
    bodies = [p.body for p in corpus]

    def encode_all() -> list[bytes]:
        frames = []
        for (id_, sender, kind, created, deadline), body in zip(heads, bodies, strict=True):
            wire, codec, dictionary_id, level = engine.encode(body, policy)
            envelope = Envelope(
                id=id_,
                sender=sender,
                kind=kind,
                created=created,
                deadline=deadline,
                content_type=ContentType.JSON,
                codec=codec,
                dictionary=dictionary_id,
                level=level,
            )
            frames.append(encode_frame(envelope, wire))
        return frames

    frames = encode_all()

    def decode_all() -> list[bytes]:
        decoded = []
        for frame in frames:
            envelope, wire = decode_frame(frame, "bench")
            body = engine.decode_cached(wire, envelope, "bench")
            if body is None:
                raise RuntimeError("the dictionary was not loaded")
            decoded.append(body)
        return decoded

    if decode_all() != bodies:
        raise RuntimeError(f"codec {name} did not round-trip the corpus")
    raw = sum(
        len(encode_frame(Envelope(id=h[0], sender=h[1], kind=h[2], created=h[3], deadline=h[4]), b))
        for h, b in zip(heads, bodies, strict=True)
    )
    compressed = sum(1 for frame in frames if decode_frame(frame)[0].codec is not Codec.NONE)
    return CodecBenchRow(
        name=name,
        raw_bytes=raw,
        wire_bytes=sum(map(len, frames)),
        compressed=compressed,
        encode_us=_cpu_us_per_message(encode_all, len(corpus), min_cpu_seconds),
        decode_us=_cpu_us_per_message(decode_all, len(corpus), min_cpu_seconds),
    )


def _cpu_us_per_message(run: Callable[[], object], count: int, min_seconds: float) -> float:
    passes = 0
    started = time.process_time_ns()
    elapsed = 0
    while passes < MAX_PASSES and (passes == 0 or elapsed < min_seconds * 1e9):
        run()
        passes += 1
        elapsed = time.process_time_ns() - started
    return elapsed / passes / count / 1000


def format_codec_bench(result: CodecBenchResult) -> str:
    """The result as a table for people."""
    share = result.below_min_size / result.messages
    lines = [
        f"demo payloads: {result.messages} messages (seed {result.seed}), "
        f"median {result.median} B, p90 {result.p90} B; "
        f"{share:.0%} are under min_size ({result.min_size} B) and go raw in every zstd row",
        "  by type: " + ", ".join(f"{t.type} ×{t.count} ~{t.median} B" for t in result.types),
        f"dictionary: {result.dictionary_bytes // 1024} KiB trained on "
        f"{result.training_messages} other messages in {result.training_cpu_s:.2f} s CPU",
        "ratio = frame bytes raw / on the wire, envelope included; CPU per message",
        "",
        f"{'codec':<12} {'ratio':>6} {'compressed':>11} {'wire bytes':>11} "
        f"{'encode µs':>10} {'decode µs':>10}",
    ]
    for row in result.rows:
        lines.append(
            f"{row.name:<12} {row.ratio:>5.2f}x {row.compressed / result.messages:>10.0%} "
            f"{row.wire_bytes:>11} {row.encode_us:>10.2f} {row.decode_us:>10.2f}"
        )
    return "\n".join(lines)
