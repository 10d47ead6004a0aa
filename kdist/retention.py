"""Retention policies (``forget``): which snapshots to keep, which to forget, and why.

This module owns the decision only. ``apply_policy`` is a pure function of the snapshots' times, ids
and tags: it never reads a repository, deletes anything or looks at the clock. The caller prints the
``Decision``, then executes it (plan, then execute), one source at a time (``group_by_source``).

The rules are restic's ``forget`` rules (``internal/restic/snapshot_policy.go``, restic >= 0.17):

* snapshots are walked newest first; ``keep_last`` keeps the N newest;
* ``keep_hourly/daily/weekly/monthly/yearly`` keep the newest snapshot of each of the N newest
  buckets (hour, calendar day, ISO week ``(iso_year, week)``, month, year) that hold a snapshot;
* if a rule still has counts left when the walk reaches the oldest snapshot, that snapshot is kept
  too (reason ``"oldest <rule>"``), so a young repository keeps its whole history span;
* ``keep_within`` (seconds) keeps every snapshot at most that much older than the group's newest
  one (restic's ``--keep-within``: relative to the newest snapshot, not to now, so a host that
  stopped backing up keeps its last stretch of history); reason ``"within"``;
* ``keep_tags`` keeps every snapshot that carries any of the tags; tags never consume counts;
* a snapshot kept by several rules is kept once and lists every reason;
* an empty policy keeps everything: callers must check ``is_empty()`` and refuse to run.

Differences from restic, on purpose: a count of -1 ("keep all") is not supported, the bucketed
``--keep-within-daily`` family is not implemented, a tag rule is a single tag (restic's tag lists
require all tags of a list), and snapshots with equal times are ordered by id (restic keeps input
order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, tzinfo
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

EMPTY_POLICY_REASON = "policy is empty"
WITHIN_REASON = "within"
TAG_REASON_PREFIX = "tag:"
OLDEST_REASON_PREFIX = "oldest "


def _hour(d: datetime) -> tuple:
    return (d.year, d.month, d.day, d.hour)


def _day(d: datetime) -> tuple:
    return (d.year, d.month, d.day)


def _iso_week(d: datetime) -> tuple:
    iso = d.isocalendar()
    return (iso[0], iso[1])  # ISO year, not calendar year: 2024-12-30 is in 2025-W01


def _month(d: datetime) -> tuple:
    return (d.year, d.month)


def _year(d: datetime) -> tuple:
    return (d.year,)


# (reason, policy field, bucket of a local datetime); ``None`` puts every snapshot in its own bucket.
_RULES: tuple[tuple[str, str, Callable[[datetime], tuple] | None], ...] = (
    ("last", "keep_last", None),
    ("hourly", "keep_hourly", _hour),
    ("daily", "keep_daily", _day),
    ("weekly", "keep_weekly", _iso_week),
    ("monthly", "keep_monthly", _month),
    ("yearly", "keep_yearly", _year),
)


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep. Counts are >= 0 (0 disables a rule); -1 ("keep all") is not supported."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_tags: tuple[str, ...] = ()  # snapshots carrying any of these tags are always kept
    keep_within: float = 0.0  # seconds before the newest snapshot of the group; 0: no such rule

    def __post_init__(self) -> None:
        within = self.keep_within
        if isinstance(within, bool) or not isinstance(within, (int, float)) or not 0 <= within < math.inf:
            raise ValueError(f"keep_within must be a number of seconds >= 0, not {within!r}")
        for f in fields(self):
            if f.name in ("keep_tags", "keep_within"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, not {value!r}")
            if value < 0:
                raise ValueError(f"{f.name} must be >= 0 (-1, keep all, is not supported), not {value}")
        tags = self.keep_tags
        if isinstance(tags, (str, bytes)):  # a bare string would silently become one tag per character
            raise ValueError(f"keep_tags must be a sequence of tags, not the string {tags!r}")
        tags = tuple(tags)
        if not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"keep_tags must hold non-empty strings, not {tags!r}")
        object.__setattr__(self, "keep_tags", tags)

    def is_empty(self) -> bool:
        """True when no rule is set: applying it would keep everything, and forgetting with it is a mistake."""
        return not self.keep_tags and not self.keep_within and all(getattr(self, attr) == 0 for _, attr, _ in _RULES)


@dataclass(frozen=True)
class Decision(Generic[T]):
    """The outcome of a policy: ``keep`` and ``forget`` partition the input, both newest first."""

    keep: list[T]
    forget: list[T]
    reasons: dict  # id -> reasons the snapshot is kept, in rule order, e.g. ["last", "daily", "tag:important"]


def _ordered(items: Sequence[T], time_of, id_of) -> list[tuple[float, object, T]]:
    """Items as (time, id, item), newest first; equal times are ordered by id, greatest first."""
    rows = []
    seen = set()
    for item in items:
        t, sid = float(time_of(item)), id_of(item)
        if not math.isfinite(t):
            raise ValueError(f"snapshot {sid!r} has no valid time ({t!r})")
        if sid in seen:
            raise ValueError(f"snapshot id {sid!r} appears more than once")
        seen.add(sid)
        rows.append((t, sid, item))
    rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
    return rows


def apply_policy(
    items: Sequence[T],
    policy: RetentionPolicy,
    *,
    time_of: Callable[[T], float] = lambda s: s.end,
    id_of: Callable[[T], Hashable] = lambda s: s.id,
    tags_of: Callable[[T], Iterable[str]] = lambda s: s.tags,
    tz: tzinfo | None = None,
) -> Decision[T]:
    """Decide which of ``items`` (snapshots of one source) ``policy`` keeps, restic-style.

    Times are seconds since the Unix epoch. Buckets use the wall clock of ``tz``, or of the machine's
    local timezone when ``tz`` is None (as restic does). Ids must be unique; ``tags_of`` is only called
    when the policy has tags. Raises ``ValueError`` on duplicate ids or non-finite times.
    """
    rows = _ordered(items, time_of, id_of)
    if policy.is_empty():
        return Decision([r[2] for r in rows], [], {r[1]: [EMPTY_POLICY_REASON] for r in rows})

    remaining = {reason: getattr(policy, attr) for reason, attr, _ in _RULES}
    last_bucket: dict[str, object] = {reason: None for reason, _, _ in _RULES}
    keep, forget, reasons = [], [], {}
    for nr, (t, sid, item) in enumerate(rows):
        when = datetime.fromtimestamp(t, tz)
        oldest = nr == len(rows) - 1
        why = []
        for reason, _, bucket_of in _RULES:
            if remaining[reason] == 0:
                continue
            bucket = ("nr", nr) if bucket_of is None else bucket_of(when)
            if bucket != last_bucket[reason]:
                why.append(reason)
            elif oldest:  # counts left at the end of the walk: keep the oldest to span the most time
                why.append(OLDEST_REASON_PREFIX + reason)
            else:
                continue
            last_bucket[reason] = bucket
            remaining[reason] -= 1
        if policy.keep_within and rows[0][0] - t <= policy.keep_within:
            why.append(WITHIN_REASON)
        if policy.keep_tags:
            tags = set(tags_of(item))
            why += [TAG_REASON_PREFIX + tag for tag in policy.keep_tags if tag in tags]
        if why:
            keep.append(item)
            reasons[sid] = why
        else:
            forget.append(item)
    return Decision(keep, forget, reasons)


MAX_BACKUP_SPAN = 24 * 3600.0  # seconds: how long before its manifest is stored a host's snapshot may be dated


def storage_bounded_time(snap, trusted_writer: bool, span: float = MAX_BACKUP_SPAN) -> float:
    """The time retention judges a snapshot by: its end, bounded by when its manifest reached
    the storage (``snap.stored``, the storage's clock, which no writer sets). No snapshot is
    later than that, so a future-dated one cannot outlive real ones; a host's snapshot is also
    no earlier than ``span`` before it, so a past-dated one can take at most the buckets of the
    last ``span`` of its own host and source. Admin and maintenance records (a repository
    upgrade re-signs old snapshots) keep their earlier times."""
    return bounded_by_storage(snap.end, snap.stored, trusted_writer, span)


def bounded_by_storage(t: float, stored: float, trusted_writer: bool, span: float = MAX_BACKUP_SPAN) -> float:
    """A writer's time ``t`` of a record first stored at ``stored`` (storage clock; 0: unknown),
    bounded as ``storage_bounded_time`` says."""
    if not stored:
        return t
    if trusted_writer:
        return min(t, stored)
    return min(max(t, stored - span), stored)


def group_by_source(
    snapshots: Iterable[T],
    key: Callable[[T], K] = lambda s: (s.source.host, s.source.user, s.source.path),
) -> dict[K, list[T]]:
    """Snapshots grouped by ``key`` (host, user, path by default), since a policy applies per source.

    Groups appear in the order their first snapshot does; each group keeps the input order.
    """
    groups: dict[K, list[T]] = {}
    for snap in snapshots:
        groups.setdefault(key(snap), []).append(snap)
    return groups
