"""The epoch manager: where index blobs go, how readers assemble the index, and compaction.

Index blobs ``xn<E>_...`` are written into the current epoch E, the largest N of an
authenticated epoch marker (0 without markers). A signed repository (format version 2) counts
only markers ``xe<N>_<16 hex>`` signed by the root or a maintenance key (every host holds the
key that seals the older kind); its markers of the older kind ``xe<N>``, sealed with the manifest
key, count only until the first signed marker is listed (``repo create`` writes one for epoch
0; ``repo upgrade``, or the first maintenance run of a repository from before signed markers,
one for its current epoch). Every marker is also written in the older kind, first, for kdist
that predates signed markers: it must never see an epoch later than this kdist does.
Maintenance advances the epoch when
the current one holds enough index blobs and its marker is at least ``min_epoch_duration`` old
(storage clock). An epoch E is *settled* once marker E+2 has existed for ``listing_settle``: no
writer can still put a blob into it (a writer's view is at most ``index_refresh`` old, which is
less than ``min_epoch_duration``, and a writer re-checks after its put, see ``write_index``).

Settled epochs are compacted into a set ``xs<E>_<set>_<i>of<n>``; every few epochs everything
up to E is merged into a range set ``xr<E>_<set>_<i>of<n>``, the only place where deleted
entries below the deletion watermark are dropped (dropping needs every older entry of the
content in the same merge). A set counts only when all n members are listed. Readers use the
complete range set with the largest E, then per epoch a complete ``xs`` set or the raw ``xn``
blobs. Superseded blobs are deleted only after their replacement has been visible for
``cleanup_margin``; a reader that finds a blob gone re-lists and assembles again.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3

from repo_format import changing, clock
from repo_format import constants as C
from repo_format.crypto import Aead, ContentHasher
from repo_format.errors import BlobNotFound, CorruptionError, KdistError, UnsupportedVersion
from repo_format.io_pool import parallel_map
from repo_format.keyslots import signed_marker, signed_set
from repo_format.index import (
    IndexBlob, IndexEntry, MergedIndex, encode_index, index_blob_name, open_index, seal_index, wins,
)
from repo_format.safety import SafetyParameters
from repo_format.storage.base import BlobMeta, BlobStorage

if TYPE_CHECKING:
    from repo_format.keyslots import Identity, Trust
    from repo_format.local_cache import LocalCache

log = logging.getLogger("kdist.index")

_RAW = re.compile(re.escape(C.INDEX_PREFIX) + r"(\d+)_([0-9a-f]+)-([0-9a-f]+)$")
_NUMBER = r"(0|[1-9][0-9]*)"  # canonical: no other spelling of a number names the same blob
_SET = re.compile(f"({re.escape(C.COMPACTED_PREFIX)}|{re.escape(C.RANGE_PREFIX)})" + _NUMBER
                  + r"_([0-9a-f]+)_" + _NUMBER + r"of([1-9][0-9]*)$")
_MARKER = re.compile(re.escape(C.EPOCH_MARKER_PREFIX) + r"(\d+)$")
_SIGNED_MARKER = re.compile(re.escape(C.EPOCH_MARKER_PREFIX) + r"(\d+)_([0-9a-f]{16})$")
_SET_SIGNATURE = re.compile(f"({re.escape(C.COMPACTED_PREFIX)}|{re.escape(C.RANGE_PREFIX)})"
                            + _NUMBER + r"_([0-9a-f]+)" + re.escape(C.SET_SIGNATURE_INFIX) + "[0-9a-f]{16}$")
_SIGNED_SETS = re.compile(re.escape(C.SIGNED_SETS_PREFIX) + r"[0-9a-f]{16}$")
MAX_MARKER = 1024  # bytes: a sealed "epoch N", or a signature with its certificate
MAX_SET_SIGNATURE = 1 << 20  # bytes: a signature, a certificate and 32 bytes a member
DOWNLOAD_BUDGET = 32 * 1024 * 1024  # bytes of index blobs being downloaded and decoded at once


class SetAbandoned(KdistError):
    """A set's member name was taken before maintenance put it (a host watching the listing):
    the set is left incomplete and unsigned, and the step is done by a later run."""


def set_key(name: str) -> tuple[str, int, str] | None:
    """(kind, epoch, set id) of a set member's or a set signature's name; None for other blobs."""
    m = _SET.fullmatch(name) or _SET_SIGNATURE.fullmatch(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def _set_preference(s: "IndexSet") -> tuple:
    return (s.newest, -int(s.set_id, 16))


class ByteBudget:
    """At most ``limit`` bytes held at once; one item larger than the limit goes alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


@dataclass
class IndexSet:
    kind: str  # C.COMPACTED_PREFIX or C.RANGE_PREFIX
    epoch: int
    set_id: str
    count: int
    members: dict[int, BlobMeta] = field(default_factory=dict)
    signature: BlobMeta | None = None  # ``<kind><epoch>_<set id>_sig<16 hex>``, put after the members
    digests: list[bytes] | None = None  # the members' digests, once the signature verified
    # every signature listed under its kind, epoch and id (a host's too): deleted with the set
    signatures: list[BlobMeta] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.members) == self.count

    def blobs(self) -> list[BlobMeta]:
        """What deleting the set deletes, in that order: its signatures first (it stops counting
        before a member goes, so no signature is ever listed over members that are gone, where
        someone could put others), then its members. ``set_of`` groups them for the deletion."""
        return list(self.signatures) + [self.members[i] for i in sorted(self.members)]

    @property
    def newest(self) -> float:
        """When the last of its members and the signature that makes it count was stored (it
        counts from then)."""
        return max([m.timestamp for m in self.members.values()] + ([self.signature.timestamp] if self.signature else []))

    def names(self) -> list[str]:
        return [self.members[i].name for i in sorted(self.members)]


@dataclass
class EpochView:
    """One listing of the index blobs, interpreted."""

    markers: dict[int, BlobMeta]  # the earliest marker that counts, per epoch
    raw: dict[int, list[BlobMeta]]
    sets: dict[tuple[str, int], list[IndexSet]]
    taken_at: float  # monotonic
    signed: bool = False  # the markers that count are signed ones
    ignored: list = field(default_factory=list)  # listed markers and signed-sets blobs that do not count (BlobMeta)
    signed_sets: bool = False  # a signed-sets blob is listed: a set counts only if signed
    ignored_sets: list = field(default_factory=list)  # complete sets that do not count (IndexSet)
    stray_signatures: list = field(default_factory=list)  # set signatures of no listed set
    # the highest epoch any listed marker names, of either kind, authentic or not: what a client
    # counting the older kind (kdist before signed markers, or any client before a repository's
    # first signed marker) may write into (``ahead``)
    named_epoch: int = 0

    def digests(self) -> dict[str, bytes]:
        """The signed digest of every member of a set that counts by its signature, by name."""
        return {m.name: st.digests[i] for sets in self.sets.values() for st in sets if st.digests
                for i, m in st.members.items()}

    @property
    def current(self) -> int:
        return max(self.markers, default=0)

    def lengths(self) -> dict[str, int]:
        """Every listed index blob's size, by name."""
        out = {m.name: m.length for blobs in self.raw.values() for m in blobs}
        for sets in self.sets.values():
            out.update((m.name, m.length) for s in sets for m in s.members.values())
        return out

    def complete_set(self, kind: str, epoch: int) -> IndexSet | None:
        """The set readers use for an epoch. For ``xs`` the *first* completed one: it was built
        while every raw blob of the epoch existed (a later duplicate may have been built after
        cleanup removed some). For ``xr`` the most recent one: a later merge of the same epochs
        differs only by dropping what the watermark allows."""
        done = [s for s in self.sets.get((kind, epoch), []) if s.complete]
        if not done:
            return None
        if kind == C.COMPACTED_PREFIX:
            return min(done, key=lambda s: (s.newest, s.set_id))
        return max(done, key=_set_preference)

    def best_range(self) -> IndexSet | None:
        ranges = [s for (kind, e), sets in self.sets.items() if kind == C.RANGE_PREFIX for s in sets if s.complete]
        return max(ranges, key=lambda s: (s.epoch,) + _set_preference(s)) if ranges else None

    def ahead(self, epoch: int) -> bool:
        """Whether raw blobs of ``epoch`` are none of a writer's: a writer writes into the epoch
        of its view, whose marker the storage had before the blob, so no further than one past
        the highest epoch a listed marker names (the one allowed for a listing that lags). That
        is a marker of either kind, authentic or not: a client that counts the older kind (kdist
        before signed markers) counts what a host forged in it. Any host can name a raw blob
        far ahead of every marker, where it would never be compacted: readers leave it out and
        maintenance deletes it (``gc/index_maintenance.superseded``)."""
        return epoch > max(self.current, self.named_epoch) + 1

    def assembly(self, up_to: int | None = None) -> list[str]:
        """The index blob names a reader reads (every epoch, or epochs up to ``up_to`` for a range
        merge): the best complete range, then per later epoch a complete ``xs`` set or raw blobs
        (none of an epoch ``ahead``)."""
        rng = self.best_range()
        first = rng.epoch + 1 if rng else 0
        names = rng.names() if rng else []
        epochs = {e for e in self.raw if not self.ahead(e)} | {e for (k, e) in self.sets if k == C.COMPACTED_PREFIX}
        for e in sorted(x for x in epochs if x >= first and (up_to is None or x <= up_to)):
            s = self.complete_set(C.COMPACTED_PREFIX, e)
            names += s.names() if s else [m.name for m in self.raw.get(e, []) if not self.ahead(e)]
        return names


class EpochManager:
    def __init__(self, storage: BlobStorage, index_aead: Aead, name_hasher: ContentHasher, marker_aead: Aead,
                 safety: SafetyParameters, session: str, cache: "LocalCache | None" = None,
                 trust: "Trust | None" = None, signer: "Identity | None" = None, unique_id: bytes = b""):
        self.storage = storage
        self._trust = trust  # a signed repository's: which markers count
        self._signer = signer  # the root's or a maintenance key's identity: it may write markers
        self._unique_id = unique_id
        self.cache = cache
        self.safety = safety
        self.session = session
        self._aead = index_aead
        self._name_hash = name_hasher
        self._marker_aead = marker_aead
        self._verified_markers: set[str] = set()
        self._rejected_markers: set[str] = set()  # a blob never changes under its name: not fetched again
        self._set_signatures: dict[str, list[bytes] | None] = {}
        self.view: EpochView | None = None
        # the blobs of the last assembly, by name: a blob never changes under its name, so a
        # reload fetches only what is new (the local cache does the same across processes)
        self._loaded: dict[str, IndexBlob] = {}
        self._loaded_lock = threading.Lock()
        # downloads held at once (sealed copy, plaintext, keys): bounded by bytes, not threads
        self._in_flight = ByteBudget(DOWNLOAD_BUDGET)
        # listing, restoring and backing up pass over a raw index blob that does not open or
        # decode: any host can put one (it holds the index key, or writes junk), and one would
        # stop every reader of the fleet. Maintenance, check and repair stay strict (False): what
        # they do not see, they might take for unreferenced (kdist.access sets it, as
        # ManifestStore.skip_unreadable)
        self.skip_unreadable = False
        self.passed_over: set[str] = set()  # raw blobs skipped at the last read of each
        self._warned: set[str] = set()  # (one warning per blob)

    # ---- listing -------------------------------------------------------------------------
    def refresh(self) -> EpochView:
        listed: dict[bool, list[tuple[int, BlobMeta]]] = {True: [], False: []}  # signed? -> markers
        raw: dict[int, list[BlobMeta]] = {}
        sets: dict[tuple[str, int], dict[tuple[str, int], IndexSet]] = {}  # (kind, epoch) -> (id, count) -> set
        signatures: dict[tuple[str, int, str], list[BlobMeta]] = {}
        since: list[BlobMeta] = []
        for m in self.storage.list(C.INDEX_FAMILY_PREFIX):
            if (mk := _MARKER.fullmatch(m.name)) or (mk := _SIGNED_MARKER.fullmatch(m.name)):
                listed[mk.re is _SIGNED_MARKER].append((int(mk.group(1)), m))
            elif mg := _SET_SIGNATURE.fullmatch(m.name):
                signatures.setdefault((mg.group(1), int(mg.group(2)), mg.group(3)), []).append(m)
            elif _SIGNED_SETS.fullmatch(m.name):
                since.append(m)
            elif mr := _RAW.fullmatch(m.name):
                raw.setdefault(int(mr.group(1)), []).append(m)
            elif ms := _SET.fullmatch(m.name):
                kind, e, sid, i, n = ms.group(1), int(ms.group(2)), ms.group(3), int(ms.group(4)), int(ms.group(5))
                if i < n:  # a member of another count is of another set (a forgery's, say)
                    sets.setdefault((kind, e), {}).setdefault((sid, n), IndexSet(kind, e, sid, n)).members[i] = m
        ignored: list[BlobMeta] = []
        signed = self._valid_markers(listed[True], True, ignored) if self._trust is not None else {}
        if signed:  # the older kind counts no more once a signed marker is listed: not even read
            ignored += [m for _e, m in listed[False]]
            markers = signed
        else:
            if self._trust is None:  # an unsigned repository has no signed markers: it reads none
                ignored += [m for _e, m in listed[True]]
            markers = self._valid_markers(listed[False], False, ignored)
        signed_sets = self._signed_sets(since, ignored)
        counted, ignored_sets = self._judge_sets(sets, signatures, signed_sets)
        self.view = EpochView(markers, raw, counted, clock.monotonic(),
                              signed=bool(signed), ignored=sorted(ignored, key=lambda m: m.name),
                              signed_sets=signed_sets, ignored_sets=ignored_sets,
                              stray_signatures=sorted((m for sigs in signatures.values() for m in sigs),
                                                      key=lambda m: m.name),
                              named_epoch=max((e for kind in listed.values() for e, _m in kind), default=0))
        return self.view

    def _signed_sets(self, listed: list[BlobMeta], ignored: list) -> bool:
        """Whether an authentic signed-sets blob (``xv_``, signed like a marker by the root or a
        maintenance key) is listed; the others go to ``ignored``."""
        valid = [m for m in listed
                 if self._trust is not None and m.length <= MAX_MARKER and self._marker_valid(m.name, True)]
        ignored += [m for m in listed if m not in valid]
        return bool(valid)

    def _judge_sets(self, sets: dict, signatures: dict, signed_sets: bool) -> tuple[dict, list]:
        """Which listed sets count: every one, until a signed-sets blob (``xv_``) is listed; then
        a complete set only if the root or a maintenance key signed its members' digests (the
        first such signature listed is the set's). Nothing here depends on when a blob was
        stored (a copy of the repository changes that). ``signatures`` is left holding those of
        no listed set (the strays)."""
        counted: dict[tuple[str, int], list[IndexSet]] = {}
        ignored: list[IndexSet] = []
        by_id: dict[tuple[str, int, str], list[IndexSet]] = {}
        for (kind, e), by_key in sets.items():
            for (sid, _n), st in by_key.items():
                by_id.setdefault((kind, e, sid), []).append(st)
        for key, group in by_id.items():
            sigs = signatures.pop(key, [])
            for st in group:
                for sig in sigs if self._trust is not None else ():
                    digests = self.signed_digests(sig)
                    if digests is not None and len(digests) == st.count:
                        st.signature, st.digests, st.signatures = sig, digests, [sig]
                        sigs = [x for x in sigs if x is not sig]
                        break
            if len(group) == 1:  # the others under its id go with it (a host's, or damaged)
                group[0].signatures += sigs
            elif sigs:  # an id of several counts: a forgery's; a signature of none is a stray
                signatures[key] = sigs
            for st in group:
                if st.digests is not None or not signed_sets or not st.complete:
                    counted.setdefault((st.kind, st.epoch), []).append(st)  # an incomplete set counts for nothing anyway
                else:
                    ignored.append(st)
        return counted, ignored

    def signed_digests(self, sig: BlobMeta) -> list[bytes] | None:
        """The member digests a set signature vouches for, or None if no root or maintenance key
        signed it (remembered, and kept in the local cache: a blob never changes under its name)."""
        if sig.name in self._set_signatures:
            return self._set_signatures[sig.name]
        body = self.cache.sealed_blob(sig.name, MAX_SET_SIGNATURE) if self.cache is not None else None
        digests = self._vouched(sig.name, body) if body is not None else None
        if digests is None:
            try:
                body = self.storage.get(sig.name) if sig.length <= MAX_SET_SIGNATURE else b""
            except BlobNotFound:
                # deleted since the listing: its set is being deleted (signature first), which
                # happens only once what replaces it has been listed for cleanup_margin, so the
                # assembly without it is the one a listing after the deletion gives
                return None
            digests = self._vouched(sig.name, body)
            if digests is not None and self.cache is not None:
                self.cache.store_blob(sig.name, body)
        self._set_signatures[sig.name] = digests
        return digests

    def _vouched(self, name: str, body: bytes) -> list[bytes] | None:
        try:
            return self._trust.set_digests(name, body) if self._trust is not None else None
        except Exception:  # whatever a hostile body holds, it vouches for nothing (and stops no reader)
            return None

    def _valid_markers(self, listed: list, signed: bool, ignored: list) -> dict[int, BlobMeta]:
        """The earliest authentic marker of each epoch among ``listed``; the others to ``ignored``."""
        out: dict[int, BlobMeta] = {}
        for e, m in listed:
            if m.length <= MAX_MARKER and self._marker_valid(m.name, signed):
                if e not in out or m.timestamp < out[e].timestamp:
                    out[e] = m
            else:
                ignored.append(m)
        return out

    def _marker_valid(self, name: str, signed: bool) -> bool:
        """Whether a listed marker authenticates (a copy in the local cache serves: markers are
        never rewritten, and the listing still decides that it exists). A forged or damaged
        marker is ignored: it cannot move epochs."""
        if name in self._verified_markers:
            return True
        if name in self._rejected_markers:
            return False
        cached = self.cache.sealed_blob(name, MAX_MARKER) if self.cache is not None else None
        if cached is not None and not self._authentic(name, cached, signed):
            self.cache.drop_blob(name)  # a damaged copy (even one that cannot be deleted): the repository's
            cached = None
        if cached is None:
            try:
                body = self.storage.get(name)
            except BlobNotFound:
                return False
            if not self._authentic(name, body, signed):
                self._rejected_markers.add(name)
                return False
            if self.cache is not None:
                self.cache.store_blob(name, body)
        self._verified_markers.add(name)
        return True

    def _authentic(self, name: str, body: bytes, signed: bool) -> bool:
        if signed:  # only a signed repository has signed markers; an unsigned one ignores them
            try:
                return self._trust is not None and len(body) <= MAX_MARKER and self._trust.marker_signed(name, body)
            except Exception:  # whatever a hostile body holds, it is no marker (and stops no reader)
                return False
        try:
            self._marker_aead.open(body, name.encode(), what=f"epoch marker {name}")
            return True
        except CorruptionError:
            return False

    def fresh_view(self) -> EpochView:
        if self.view is None or clock.monotonic() - self.view.taken_at >= self.safety.index_refresh:
            return self.refresh()
        return self.view

    # ---- reading -------------------------------------------------------------------------
    def load_index(self) -> MergedIndex:
        """Assemble the current index; re-list and start again if a blob vanished meanwhile.
        Only blobs this manager (or the local cache) does not hold already are fetched."""
        for _ in changing.attempts("the index blobs"):
            view = self.refresh()
            names = view.assembly()
            try:
                blobs = self._read_blobs(names)
            except BlobNotFound:
                continue  # superseded and cleaned up after our listing: the new listing has its set
            with self._loaded_lock:  # what a compaction replaced is let go
                self._loaded = dict(zip(names, blobs))
            if self.cache is not None:
                self.cache.retain_index(set(names))
                signatures = {st.signature.name for sets in view.sets.values() for st in sets if st.signature}
                for kind in (C.COMPACTED_PREFIX, C.RANGE_PREFIX):  # superseded sets' signatures go too
                    self.cache.retain_blobs(kind, signatures)
            return MergedIndex(blobs, names)
        raise AssertionError("unreachable: changing.attempts raises when they run out")

    def loaded_names(self) -> set[str]:
        """The index blobs of the last assembly (what the local cache must keep)."""
        with self._loaded_lock:
            return set(self._loaded)

    def _read_blobs(self, names: list[str]) -> list[IndexBlob]:
        lengths = self.view.lengths() if self.view is not None else {}
        digests = self.view.digests() if self.view is not None else {}

        def read(name):
            with self._loaded_lock:
                blob = self._loaded.get(name) if name not in self.passed_over else None  # fetched again
            if blob is not None and (blob.source is None or self.cache.still_authentic(name, blob)):
                return blob  # every load authenticates the cache files it uses, mapped before or not
            if self.cache is not None and (blob := self.cache.index_blob(name)) is not None:
                return blob
            with self._in_flight.hold(lengths.get(name, 0)):
                sealed = self.storage.get(name)
                if name in digests and blake3.blake3(sealed).digest() != digests[name]:
                    raise CorruptionError(f"index set member {name} is not the blob its set's signature names "
                                          "(written by someone other than maintenance)")
                try:
                    blob = open_index(self._aead, name, sealed)
                except (CorruptionError, UnsupportedVersion) as exc:
                    if not (self.skip_unreadable and name.startswith(C.INDEX_PREFIX)):  # sets are signed
                        raise
                    try:  # once more: a host's junk fails again, bytes damaged on the way rarely do
                        blob = open_index(self._aead, name, self.storage.get(name))
                    except (CorruptionError, UnsupportedVersion):
                        return self._pass_over(name, exc)
                if name in self.passed_over:  # it reads now
                    with self._loaded_lock:
                        self.passed_over.discard(name)
                if self.cache is not None:  # then read through the mapping: the download is let go
                    blob = self.cache.store_index(name, blob) or blob
            return blob

        return parallel_map(read, names)

    def _pass_over(self, name: str, exc: Exception) -> IndexBlob:
        """An unreadable raw blob, for a reader that passes over it: no entries, and one warning.
        Fetched again at every load (a blob that failed on the way counts again as soon as it
        reads, for a writer's undeletes). A version this kdist does not know is no exception:
        a new index encoding comes with a new format version (SPEC section 6), which this kdist
        would have refused as a whole, so such a blob is not one a kdist wrote."""
        with self._loaded_lock:
            first = name not in self._warned
            self.passed_over.add(name)
            self._warned.add(name)
        if first:
            log.warning("kdist: %s; passed over (a key of this repository may have written it, or it is "
                        "damaged: `kdist repo check` names it; maintenance stops on it until `kdist repo "
                        "repair` deletes it)", exc)
        return IndexBlob(encode_index([]))

    # ---- writing -------------------------------------------------------------------------
    def write_index(self, entries: list[IndexEntry]) -> str:
        """Write entries into the current epoch; rewrite them if the epoch settled meanwhile."""
        return self.write_plaintext(encode_index(entries))

    def write_plaintext(self, plaintext: bytes) -> str:
        """``write_index`` for an encoded blob (maintenance's merges encode rows themselves)."""
        epoch = self.fresh_view().current
        while True:
            name = self._raw_name(plaintext, epoch)
            # create-only: a taken name holds these very entries (it is a keyed hash of them,
            # written by this session), and writers never replace a blob
            self.storage.put_if_absent(name, seal_index(self._aead, name, plaintext))
            current = self.refresh().current
            if current <= epoch:
                return name
            # The epoch advanced while we wrote (or we were paused): a compaction of ours may
            # already have listed its blobs, so write the same entries into the current epoch.
            # (One advance is enough to check: min_epoch_duration exceeds any listing lag.)
            epoch = current

    def _raw_name(self, plaintext: bytes, epoch: int) -> str:
        return index_blob_name(self._name_hash, plaintext, epoch, self.session)

    def write_marker(self, epoch: int) -> bool:
        """Start epoch ``epoch``. A signed repository's marker has a name of its own (no one can
        take it first) and the writer's signature; only the root and maintenance keys write one."""
        if self._trust is not None and self._signer is None:
            raise KdistError("only the root and maintenance keys may write epoch markers")
        legacy = f"{C.EPOCH_MARKER_PREFIX}{epoch}"
        # the older kind too, first: kdist that predates signed markers counts only those, and must
        # see every epoch no later than this kdist does (a host that took the name first changes
        # nothing here: this kdist ignores that kind)
        wrote = self.storage.put_if_absent(legacy, self._marker_aead.seal(b"epoch %d" % epoch, legacy.encode()))
        if self._trust is None:
            return wrote
        name = f"{C.EPOCH_MARKER_PREFIX}{epoch}_{secrets.token_hex(8)}"
        return self.storage.put_if_absent(name, signed_marker(self._signer, self._unique_id, name))

    def sign_epochs(self, view: EpochView) -> bool:
        """In a signed repository whose markers are all of the older kind (one upgraded from
        format version 1), sign its current epoch: from then on only signed markers count. In
        one without a signed-sets blob (made before signed sets), put one. Returns whether it
        wrote anything."""
        if self._trust is None or self._signer is None:
            return False
        marker = not view.signed and self.write_marker(view.current)
        return self.require_signed_sets(view) or marker

    # ---- maintenance ---------------------------------------------------------------------
    def should_advance(self, view: EpochView, now: float) -> bool:
        """Advance at most once per ``min_epoch_duration`` (storage clock), when the current or
        previous epoch holds index blobs: they can only be compacted, and their deletions
        dropped, once two markers follow them."""
        cur = view.current  # epoch 0 begins with the repository, whatever its marker says
        marker_age = now - view.markers[cur].timestamp if cur in view.markers and cur > 0 else float("inf")
        if marker_age < self.safety.min_epoch_duration:
            return False
        return bool(view.raw.get(cur)) or bool(view.raw.get(cur - 1))

    def settled(self, view: EpochView, now: float) -> list[int]:
        """Epochs no writer can still add to."""
        cur = view.current
        marker = view.markers.get(cur)
        if cur < 2 or marker is None:
            return []
        last = cur - 2 if now - marker.timestamp >= self.safety.listing_settle else cur - 3
        return list(range(0, last + 1))

    def write_set(self, kind: str, epoch: int, entries: list[IndexEntry]) -> IndexSet:
        """Publish entries as a complete set (members first; the set counts once all are listed)."""
        entries = sorted(entries, key=lambda e: e.content_id)
        per = C.INDEX_BLOB_MAX_ENTRIES
        chunks = [entries[i:i + per] for i in range(0, len(entries), per)] or [[]]
        return self.put_set(kind, epoch, [lambda c=c: encode_index(c) for c in chunks])

    def put_set(self, kind: str, epoch: int, members: list) -> IndexSet:
        """Put a set whose members' plaintexts (sorted, covering consecutive id ranges) the
        callables ``members`` give, one at a time (a set larger than memory is put from files)."""
        if self._trust is not None and self._signer is None:
            raise KdistError("only the root and maintenance keys may write index sets")
        set_id = secrets.token_hex(8)
        s = IndexSet(kind, epoch, set_id, len(members))
        digests = []
        for i, plaintext in enumerate(members):
            name = f"{kind}{epoch}_{set_id}_{i}of{len(members)}"
            sealed = seal_index(self._aead, name, plaintext())
            if not self.storage.put_if_absent(name, sealed):  # someone took the name first
                raise SetAbandoned(f"index set member {name} exists already: the set is abandoned")
            s.members[i] = BlobMeta(name, len(sealed), 0.0)
            digests.append(blake3.blake3(sealed).digest())
        if self._trust is not None:  # last: the set counts once its signature is listed
            s.signature, s.digests = self._sign_set(s, digests), digests
            s.signatures = [s.signature]
        return s

    def _sign_set(self, s: IndexSet, digests: list[bytes]) -> BlobMeta:
        """Put the signature of set ``s`` over its members' digests, under a name of its own (no
        one can take it first)."""
        name = f"{s.kind}{s.epoch}_{s.set_id}{C.SET_SIGNATURE_INFIX}{secrets.token_hex(8)}"
        body = signed_set(self._signer, self._unique_id, name, digests)
        self.storage.put_if_absent(name, body)
        return BlobMeta(name, len(body), 0.0)

    def require_signed_sets(self, view: EpochView) -> bool:
        """In a signed repository without a signed-sets blob (one made before signed sets): sign
        every complete set that counts now (reading its members), then put that blob; from then
        on a set counts only if signed. Returns whether it wrote the blob. (Trust on first use: a
        set a host forged before this is signed too; SECURITY.md.)"""
        if self._trust is None or self._signer is None or view.signed_sets:
            return False
        for sets in view.sets.values():
            for st in sets:
                if st.complete and st.digests is None:
                    try:
                        digests = [blake3.blake3(self.storage.get(n)).digest() for n in st.names()]
                    except BlobNotFound:
                        continue  # deleted since the listing: superseded, not needed
                    self._sign_set(st, digests)
        name = C.SIGNED_SETS_PREFIX + secrets.token_hex(8)
        return self.storage.put_if_absent(name, signed_marker(self._signer, self._unique_id, name))

    def read_blobs(self, names: list[str]) -> list[IndexBlob]:
        """The blobs named, through this manager's memory and the local cache."""
        return self._read_blobs(names)

    def read_entries(self, names: list[str]) -> list[IndexEntry]:
        merged: dict[bytes, IndexEntry] = {}
        for blob in self._read_blobs(names):
            for e in blob:
                cur = merged.get(e.content_id)
                if cur is None or wins(e, cur):
                    merged[e.content_id] = e
        return list(merged.values())
