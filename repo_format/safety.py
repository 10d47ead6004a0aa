"""Safety parameters of the lock-free protocol, and their named presets.

They live in the format blob (``parameters.extra["safety"]``) so every client and every
maintenance run of a repository uses the same values; a test shortens them by creating its
repository with shorter values, never through a code path only tests use. All durations are in
seconds and are measured on the storage's clock (blob timestamps), except ``index_refresh``,
which a writer measures on its own monotonic clock (a duration, immune to wall-clock skew).
gc/README.md states why each value must be what it is relative to the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from repo_format.errors import CorruptionError

HOUR = 3600.0
MINUTE = 60.0


@dataclass(frozen=True)
class SafetyParameters:
    min_content_age: float = 24 * HOUR  # unreferenced contents younger than this are not marked deleted
    drop_margin: float = 4 * HOUR  # GC cycles this far apart before deleted contents are dropped
    pack_age: float = 24 * HOUR  # unreferenced packs younger than this are not deleted
    session_expiry: float = 2 * HOUR  # a session marker not refreshed for this long is dead
    session_heartbeat: float = 10 * MINUTE  # writers refresh their session marker this often
    checkpoint_interval: float = 45 * MINUTE  # backups publish a checkpoint at least this often
    index_refresh: float = 10 * MINUTE  # a writer's index view is never older than this
    min_epoch_duration: float = 1 * HOUR  # at least this long between two epoch markers
    listing_settle: float = 5 * MINUTE  # a listing includes every blob older than this
    cleanup_margin: float = 1 * HOUR  # superseded index blobs are deleted this long after replacement
    max_pause: float = 15 * MINUTE  # a maintenance run paused longer than this re-validates or aborts

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v < 0:
                raise CorruptionError(f"invalid safety parameter {f.name}={v!r}")
        if self.is_unsafe():
            return
        problems = []
        if self.min_epoch_duration <= self.index_refresh + self.listing_settle:
            problems.append("min_epoch_duration must exceed index_refresh + listing_settle")
        if self.drop_margin <= self.checkpoint_interval + self.index_refresh:
            problems.append("drop_margin must exceed checkpoint_interval + index_refresh")
        if self.session_expiry <= 2 * self.session_heartbeat:
            problems.append("session_expiry must exceed twice session_heartbeat")
        if self.max_pause >= self.drop_margin:
            problems.append("max_pause must be less than drop_margin")
        if self.pack_age <= self.session_expiry or self.pack_age <= self.listing_settle:
            problems.append("pack_age must exceed session_expiry and listing_settle")
        if problems:
            raise CorruptionError("inconsistent safety parameters: " + "; ".join(problems))

    def is_unsafe(self) -> bool:
        """True for the ``none`` preset's zero margins (tests only)."""
        return self.min_content_age == 0 and self.pack_age == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SafetyParameters":
        if not d:
            return SAFETY_FULL
        known = {f.name for f in fields(cls)}
        try:
            p = cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise CorruptionError("malformed safety parameters") from exc
        p.validate()
        return p

    def scaled(self, factor: float) -> "SafetyParameters":
        """Every duration multiplied by ``factor`` (thresholds unchanged): short margins that keep
        the same proportions, for tests and soak runs that must see margins pass."""
        scaled = replace(self, **{f.name: getattr(self, f.name) * factor for f in fields(self)
                                  if isinstance(getattr(self, f.name), float)})
        # a maintenance run needs real seconds between planning and deleting, however short the
        # margins: keep max_pause at a quarter of the drop margin at least (see validate)
        return replace(scaled, max_pause=max(scaled.max_pause, min(self.max_pause, scaled.drop_margin / 4)))


SAFETY_FULL = SafetyParameters()
SAFETY_NONE = SafetyParameters(
    min_content_age=0.0, drop_margin=0.0, pack_age=0.0, session_expiry=0.0, session_heartbeat=0.0,
    checkpoint_interval=0.0, index_refresh=0.0, min_epoch_duration=0.0, listing_settle=0.0,
    cleanup_margin=0.0, max_pause=SAFETY_FULL.max_pause,
)
PRESETS = {"full": SAFETY_FULL, "none": SAFETY_NONE}


def safety_of(parameters) -> SafetyParameters:
    """The safety parameters stored in a repository's ``RepositoryParameters``."""
    return SafetyParameters.from_dict(parameters.extra.get("safety"))
