"""`synthetic_snapshots`: a deterministic made-up mesh, for tests and the benchmark.

The shape is meant to give every rule of the analysis real work:

- agents with 1–4 instances and a service time each (log-normal, median 2 ms; a few
  agents are slow enough to be bottlenecks);
- request subjects ``svc.<agent>.op<k>``, each handled by its owner in a queue group
  named after it, and called by agents "upstream" of it, so request chains are several
  hops deep (with the odd cycle);
- event subjects ``evt.<agent>.t<k>``, published by their owner or others, received by
  one to three agents as broadcast or queue-group subscriptions, some through a
  wildcard ``evt.<agent>.*``, one in twenty by nobody;
- external senders (``cli`` requests, plain NATS ``""`` events);
- latency histograms for round trips and handlers, some handler errors, timeouts,
  failed requests and decode failures, compression on large messages, and growing
  pending counts on overloaded agents when there is more than one round.

What subscribers receive is derived from what publishers sent, split over queue group
members, so the snapshots are consistent with each other.
"""

from __future__ import annotations

import random
from typing import Final

from topology._histogram import HIGHEST_TRACKABLE_NS, HistogramCounts, bucket_index
from topology._match import PatternIndex
from topology._snapshot import ReceivedStats, SentStats, Snapshot

__all__ = ["synthetic_snapshots"]

_NS: Final = 1_000_000_000
#: 2023-11-14T22:13:20Z: any fixed instant will do.
START_NS: Final = 1_700_000_000 * _NS
_ENVELOPE: Final = 48  # frame bytes around a body
_COMPRESS_ABOVE: Final = 1024
_NETWORK_NS: Final = 300_000


class _Sub:
    __slots__ = ("agent", "pattern", "queue", "subjects")

    def __init__(self, agent: int, pattern: str, queue: str) -> None:
        self.agent, self.pattern, self.queue = agent, pattern, queue
        self.subjects: tuple[str, ...] = ()


class _Plan:
    """Who exists, who publishes what, who subscribes to what."""

    def __init__(self, rng: random.Random, agents: int, edges: int) -> None:
        self.names = [f"agent-{i:04d}" for i in range(agents)]
        self.instances = [
            rng.choices((1, 2, 3, 4), weights=(50, 25, 15, 10))[0] for _ in self.names
        ]
        self.service_ns = [
            int(2_000_000 * rng.lognormvariate(0.0, 1.0)) + 50_000 for _ in self.names
        ]
        n_subjects = max(2, edges // 4)
        #: subject -> (owner, is_request, body size)
        self.subjects: dict[str, tuple[int, bool, int]] = {}
        for k in range(n_subjects):
            owner = k % agents
            request = rng.random() < 0.6
            name = (
                f"{'svc' if request else 'evt'}.{self.names[owner]}.{'op' if request else 't'}{k}"
            )
            size = min(200_000, max(20, int(800 * rng.lognormvariate(0.0, 1.2))))
            self.subjects[name] = (owner, request, size)
        self.subs: list[_Sub] = []
        events = [s for s, (_, req, _) in self.subjects.items() if not req]
        silent: list[str] = []
        seen_events = 0
        for subject, (owner, request, _) in self.subjects.items():
            if request:
                self.subs.append(_Sub(owner, subject, self.names[owner]))
                continue
            seen_events += 1
            if seen_events % 20 == 2:
                silent.append(subject)  # one event in 20: nobody listens
                continue
            for agent in rng.sample(range(agents), k=min(agents, rng.randint(1, 3))):
                queue = self.names[agent] if rng.random() < 0.5 else ""
                self.subs.append(_Sub(agent, subject, queue))
        for agent in rng.sample(range(agents), k=max(1, agents // 30)):
            owner = rng.randrange(agents)
            self.subs.append(_Sub(agent, f"evt.{self.names[owner]}.*", ""))
        index = PatternIndex(sub.pattern for sub in self.subs)
        listeners: dict[str, set[int]] = {}
        for sub in self.subs:
            listeners.setdefault(sub.pattern, set()).add(sub.agent)
        #: (publisher, subject) -> messages per interval and instance
        self.publications: dict[tuple[int, str], int] = {
            (self.subjects[s][0], s): 0 for s in silent
        }
        #: Who talks to whom: publications are added until there are ``edges`` pairs.
        pairs: set[tuple[int, int]] = set()
        names = list(self.subjects)
        attempts = 0
        while len(pairs) < edges and attempts < edges * 20:
            attempts += 1
            subject = rng.choice(names)
            owner, request, _ = self.subjects[subject]
            if request:
                # Mostly upstream callers (lower index): chains with depth, rare cycles.
                span = rng.randint(1, 60)
                caller = (owner - span) % agents if rng.random() < 0.97 else rng.randrange(agents)
                if caller == owner:
                    continue
            else:
                caller = owner if rng.random() < 0.4 else rng.randrange(agents)
            self.publications.setdefault((caller, subject), 0)
            for pattern in index.match(subject):
                pairs.update((caller, agent) for agent in listeners[pattern])
        for key in self.publications:
            self.publications[key] = max(1, int(4 * rng.lognormvariate(0.0, 0.8)))
        reach: dict[str, list[str]] = {}
        for subject in sorted({s for _, s in self.publications}):
            for pattern in index.match(subject):
                reach.setdefault(pattern, []).append(subject)
        for sub in self.subs:
            sub.subjects = tuple(reach.get(sub.pattern, ()))
        requests = [s for s, (_, req, _) in self.subjects.items() if req]
        #: External senders: (name, subject, msgs per interval).
        self.external = [("cli", rng.choice(requests), 2) for _ in range(3) if requests] + [
            ("", rng.choice(events), 5) for _ in range(3) if events
        ]
        #: Agents whose handlers fail now and then, and receivers of undecodable frames.
        handlers = sorted({sub.agent for sub in self.subs if sub.subjects})
        self.erratic = set(rng.sample(handlers, k=min(len(handlers), max(1, agents // 25))))
        self.refusing = set(rng.sample(handlers, k=min(len(handlers), max(1, agents // 100))))


def _histogram(rng: random.Random, n: int, median_ns: int) -> HistogramCounts | None:
    if n <= 0:
        return None
    counts: dict[int, int] = {}
    lo, hi, total = HIGHEST_TRACKABLE_NS, 0, 0
    for _ in range(n):
        value = min(HIGHEST_TRACKABLE_NS, int(median_ns * rng.lognormvariate(0.0, 0.5)))
        index = bucket_index(value)
        counts[index] = counts.get(index, 0) + 1
        lo, hi, total = min(lo, value), max(hi, value), total + value
    return HistogramCounts(counts=dict(sorted(counts.items())), min=lo, max=hi, sum=total)


def _split(count: int, parts: int, part: int) -> int:
    """Member ``part``'s share of ``count`` messages spread over ``parts`` queue members."""
    return count // parts + (1 if part < count % parts else 0)


def synthetic_snapshots(
    agents: int = 1000,
    edges: int = 5000,
    seed: int = 0,
    *,
    rounds: int = 1,
    interval_ns: int = _NS,
    start_ns: int = START_NS,
) -> list[Snapshot]:
    """Snapshots of a made-up mesh of ``agents`` agents with about ``edges``
    agent-to-agent edges (distinct sender → receiver pairs among them; each comes with
    the publish and deliver edges that carry it), ``rounds`` snapshots per instance.
    The same arguments always give the same snapshots, ordered by round, agent and
    instance."""
    if agents < 1 or edges < 1 or rounds < 1 or interval_ns <= 0:
        raise ValueError("agents, edges, rounds and interval_ns must be positive")
    rng = random.Random(seed)
    plan = _Plan(rng, agents, edges)
    return [snap for r in range(rounds) for snap in _round(rng, plan, r, interval_ns, start_ns)]


def _round(
    rng: random.Random, plan: _Plan, r: int, interval_ns: int, start_ns: int
) -> list[Snapshot]:
    names, subjects = plan.names, plan.subjects
    sent: dict[int, list[list[SentStats]]] = {
        a: [[] for _ in range(n)] for a, n in enumerate(plan.instances)
    }
    #: subject -> sender name -> messages this round
    traffic: dict[str, dict[str, int]] = {}
    for (agent, subject), rate in plan.publications.items():
        owner, request, size = subjects[subject]
        total = traffic.setdefault(subject, {})
        for slot in sent[agent]:
            msgs = max(1, int(rate * rng.uniform(0.7, 1.3)))
            compressed = msgs if size > _COMPRESS_ABOVE else 0
            wire = (int(size * 0.35) if compressed else size) * msgs + _ENVELOPE * msgs
            failed = int(rng.random() < 0.05) if request else 0
            median = plan.service_ns[owner] + _NETWORK_NS
            slot.append(
                SentStats(
                    subject=subject,
                    msgs=msgs,
                    raw_bytes=size * msgs,
                    wire_bytes=wire,
                    requests=msgs if request else 0,
                    failed=failed,
                    compressed=compressed,
                    latency=_histogram(rng, msgs - failed, median) if request else None,
                )
            )
            total[names[agent]] = total.get(names[agent], 0) + msgs
    for name, subject, msgs in plan.external:
        total = traffic.setdefault(subject, {})
        total[name] = total.get(name, 0) + msgs
    received: dict[int, list[list[ReceivedStats]]] = {
        a: [[] for _ in range(n)] for a, n in enumerate(plan.instances)
    }
    arrivals = [0.0] * len(names)
    for sub in plan.subs:
        by_sender: dict[str, int] = {}
        size_sum = 0
        request = False
        for subject in sub.subjects or (sub.pattern,):
            _, is_request, size = subjects.get(subject, (0, False, 0))
            request = request or is_request
            for sender, n in traffic.get(subject, {}).items():
                by_sender[sender] = by_sender.get(sender, 0) + n
                size_sum += size * n
        members = plan.instances[sub.agent]
        for k, inbox in enumerate(received[sub.agent]):
            senders = {
                s: share
                for s, n in sorted(by_sender.items())
                if (share := _split(n, members, k) if sub.queue else n)
            }
            msgs = sum(senders.values())
            avg = size_sum // max(1, sum(by_sender.values()))
            failures = {}
            if sub.agent in plan.refusing and senders:
                sender = next(iter(senders))
                failures[sender] = min(senders[sender], 1 + r % 2)
            handled = msgs - sum(failures.values())
            errors = (
                sum(rng.random() < 0.05 for _ in range(handled)) if sub.agent in plan.erratic else 0
            )
            timeouts = int(errors > 0 and rng.random() < 0.3)
            arrivals[sub.agent] += msgs
            overloaded = plan.service_ns[sub.agent] > 20_000_000
            inbox.append(
                ReceivedStats(
                    subject=sub.pattern,
                    queue=sub.queue,
                    msgs=msgs,
                    raw_bytes=avg * msgs,
                    wire_bytes=(int(avg * 0.35) if avg > _COMPRESS_ABOVE else avg) * msgs
                    + _ENVELOPE * msgs,
                    senders=senders,
                    handled=handled,
                    errors=errors,
                    timeouts=timeouts,
                    latency=_histogram(rng, handled, plan.service_ns[sub.agent]),
                    replies=handled - errors if request else 0,
                    reply_bytes=(handled - errors) * 200 if request else 0,
                    decode_failures=failures,
                    pending=(r + 1) * 15 if overloaded and msgs else 0,
                    inflight=min(msgs, 4),
                )
            )
    time_ns = start_ns + (r + 1) * interval_ns
    snapshots = []
    for agent, name in enumerate(names):
        busy = min(1.0, arrivals[agent] * plan.service_ns[agent] / _NS / plan.instances[agent])
        for k in range(plan.instances[agent]):
            snapshots.append(
                Snapshot(
                    instance=f"{name}-{k}",
                    agent=name,
                    seq=r,
                    time=time_ns,
                    interval=interval_ns,
                    cpu=round(0.02 + 0.6 * busy * interval_ns / _NS, 6),
                    rss=(40 + (agent * 7 + k * 13) % 400) * 1024 * 1024,
                    max_concurrency=8,
                    sent=sent[agent][k],
                    received=received[agent][k],
                    policy_rejected=int(agent in plan.refusing),
                )
            )
    return snapshots
