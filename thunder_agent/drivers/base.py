"""The contract between the agent's manager and a data-plane driver.

A driver turns records into a running data plane:

* a **template** per image: a read-only device presenting the whole image,
  fetching missing blocks on demand from its *sources* (the origin or a
  parent's export), keeping every block it fetched in a local cache, and
  exported so that local snapshots, the prefetcher and child nodes read it;
* a **snapshot** per instance: a writable copy-on-write layer over the
  local template.

A driver owns everything that differs per transport: which origins it can
read and relay, how its exports are addressed (and how a parent's
:class:`~thunder_agent.records.RelayAddress` from the coordinator becomes a
:class:`~thunder_agent.records.Source`), how a source is probed, what the
prefetcher reads, how a template is moved to another parent.

The manager owns validation, records, states, locking, reference counting
and eviction. Drivers **return values** (exports, connection info, the
``driver_state`` they want kept) and never change a record they are given:
the manager stores what they return. They are called without any agent
lock held and may take their time, but every wait they do has a deadline
of their own options. A driver never raises for bad input (the manager
checked it); data-plane failures are :class:`BackendError` and its
subclasses. Methods documented as idempotent are called blindly after a
restart.
"""

import abc
import dataclasses

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class OriginInfo:
    size: int
    image_format: str


@dataclasses.dataclass(frozen=True)
class TemplateBuild:
    """What building or restoring a template produced."""

    export: object          # records.Export
    # Replaces the template's driver_state (None: keep it as it is).
    driver_state: dict = None


@dataclasses.dataclass(frozen=True)
class TemplateStats:
    # Bytes copied from the sources into the local cache since creation.
    bytes_fetched: int = 0
    # Bytes handed out by the template's export to its readers (zeros the
    # cache keeps as zero clusters are not counted: they cost no I/O).
    bytes_served: int = 0
    # Bytes of the image present in the local cache.
    cached_bytes: int = 0
    # The same in cache blocks of ``block_size`` bytes.
    blocks_cached: int = 0
    block_size: int = 0
    # Disk space the cache takes on the host.
    disk_bytes: int = 0

    # Bytes the template's verifier read from its parents and from the
    # origin, and parent blocks it rejected (digest not the manifest's).
    bytes_from_parents: int = 0
    bytes_from_origin: int = 0
    blocks_rejected: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SourceMismatch:
    """A parent sent blocks whose digest is not the manifest's: the
    template reads from the origin since, and the parent must be reported
    and replaced."""

    parent: str                 # the parent's address, as read
    bad_blocks: tuple           # block indexes
    block_size: int
    time: float                 # seconds since the epoch


class Driver(metaclass=abc.ABCMeta):
    """A data-plane driver. ``conf`` is the agent's ConfigOpts."""

    name = None
    # Seconds between two :meth:`source_ready` polls while a new template
    # waits for a parent that is still building its own.
    ready_poll_interval = 0.5

    def __init__(self, conf):
        self.conf = conf

    def start(self):
        """Called once when the agent starts, before reconciliation."""

    def stop(self):
        """Called when the agent stops. The data plane keeps running."""

    # -- transport ------------------------------------------------------
    @abc.abstractmethod
    def check_origin(self, origin):
        """Refuse (InvalidOrigin) an origin this driver cannot read.

        *origin* is a validated :class:`~thunder_agent.records.Endpoint`.
        Changes nothing.
        """

    @abc.abstractmethod
    def can_relay(self, image_id, origin):
        """True when a template of *origin* can take part in a relay tree
        (its children can read what it reads). May raise InvalidOrigin for
        an origin that could relay but is unfit (wrong export name)."""

    @abc.abstractmethod
    def relay_address(self, image_id, taken):
        """The :class:`~thunder_agent.records.RelayAddress` a new relaying
        template of *image_id* will be exported under. *taken* holds the
        addresses of this host's other templates (a port is never given
        twice)."""

    @abc.abstractmethod
    def parent_source(self, node, address, image_id):
        """The :class:`~thunder_agent.records.Source` that reads the export
        of parent *node* at *address*.

        The address comes from another host through the coordinator: the
        driver checks it against its own rules (networks, ports, export
        name) and raises InvalidAddress (an InvalidInput) for one this host
        must not use. The one exception to "drivers never raise for bad
        input": only the driver knows its transport's rules."""

    @abc.abstractmethod
    def probe_source(self, source, image_format):
        """Open *source* read-only; return its :class:`OriginInfo`.

        Raises OriginUnavailable when it cannot be read or is not of
        *image_format*. Bounded by the driver's own timeouts.
        """

    @abc.abstractmethod
    def source_ready(self, source):
        """True when *source* serves the image now (a parent that joined
        the tree a moment ago may still be building its template). Cheap
        and bounded: it is polled every :attr:`ready_poll_interval`."""

    @abc.abstractmethod
    def source_answers(self, source, timeout):
        """True when *source* accepts a connection within *timeout*
        seconds (the cheap, periodic liveness probe of a parent)."""

    # -- templates ------------------------------------------------------
    @abc.abstractmethod
    def create_template(self, template, template_dir):
        """Build the template's data plane; return a :class:`TemplateBuild`.

        *template_dir* belongs to this template. ``template.export`` holds
        the relay address the manager reserved (or is None). On failure the
        driver leaves nothing running.
        """

    @abc.abstractmethod
    def ensure_template(self, template, template_dir):
        """Make the data plane match the record (after a restart, or when
        :meth:`is_healthy` said no). Re-adopts what still runs, rebuilds
        what does not, reusing the cache on disk. Idempotent. Returns a
        :class:`TemplateBuild` (the export must not change for readers
        that still use it)."""

    @abc.abstractmethod
    def set_sources(self, template, template_dir, sources):
        """Switch the template to fetch misses from *sources* (re-parent).

        In-flight and later reads must block and resume, never fail.
        Returns the new driver_state (None: unchanged).
        """

    def source_mismatch(self, template, template_dir):
        """A :class:`SourceMismatch` when the template's current parent
        sent bytes that failed their check, else None (also for drivers
        that check nothing)."""
        return None

    def set_children(self, template, template_dir, children):
        """Admit exactly *children* (node ids, the relay tree's current
        children of this node) to the template's relay export, from their
        next connection on. A driver without client authorization admits
        whoever reaches the relay address: nothing to do."""
        return None

    @abc.abstractmethod
    def delete_template(self, template, template_dir):
        """Tear the template down; the manager removes the directory.

        Raises TemplateInUse when readers the manager cannot see (snapshot
        devices, child sessions) still use it. Tolerates missing pieces.
        """

    def is_healthy(self, template, template_dir):
        """True when the template's data plane is up."""
        return True

    def flush_template(self, template, template_dir):
        """Persist cache metadata so cached blocks survive a crash.

        Bounded by the driver's own timeout; raises BackendError."""

    @abc.abstractmethod
    def template_stats(self, template, template_dir):
        """Return ``(TemplateStats, driver_state or None)``."""

    @abc.abstractmethod
    def disk_usage(self, template, template_dir):
        """Bytes of local disk the template's cache takes (for eviction)."""

    def cache_capacity(self, template, template_dir):
        """Most bytes of local disk the template's cache can ever take:
        its :meth:`disk_usage` once every block of the image is cached,
        metadata included. Any reader may make that happen (a VM, a child,
        the prefetcher, an NBD_CMD_CACHE request), so the manager admits a
        template only when this fits the free space and ``[cache]
        size_limit_mb`` (see :mod:`thunder_agent.manager`); an estimate
        too low turns a full disk into VM read errors, one too high only
        refuses templates early.

        Cheap and without I/O beyond a small file read: it is asked for
        every template at every admission and status. *template_dir* may
        not exist yet (a template being admitted).

        The default is conservative for a sparse cache file that a
        block cache may fill whole over time, the kernel driver's layout:
        twice the image with a 1 GiB floor ([kernel] cache_size_ratio 2.0,
        cache_min_size_mb 1024) plus its metadata, at most 4 MiB and 16
        bytes per 64 KiB block (dm-cache; bcache's superblock file is
        1 MiB). ``2 * size + 1 GiB`` covers that for every image from
        2.5 MiB to 2 TiB (a 2 GiB image: 5 GiB). A driver that knows its
        layout says exactly (the qemu driver: the image plus 0.02 %).
        """
        return 2 * template.size + GIB

    @abc.abstractmethod
    def prefetch_target(self, template, template_dir):
        """What the prefetcher reads so that blocks land in the cache as a
        VM's reads would: a :class:`thunder_agent.prefetch.NbdAddress` or
        a :class:`thunder_agent.prefetch.BlockDevice`."""

    # -- snapshots ------------------------------------------------------
    @abc.abstractmethod
    def create_snapshot(self, template, template_dir, instance_id,
                        snapshot_dir):
        """Create the writable layer; return its connection_info dict.

        The dict has ``driver_volume_type`` ``'thunder'`` and a ``data``
        dict the libvirt volume driver understands.
        """

    @abc.abstractmethod
    def ensure_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        """Re-adopt or rebuild a snapshot after a restart. Idempotent.

        Returns the connection_info, which must not change for a running VM.
        """

    @abc.abstractmethod
    def snapshot_users(self, template, snapshot, snapshot_dir):
        """Why the snapshot must not be deleted now (a process or device
        has it open), as a sentence, or None. *template* may be None (see
        :meth:`delete_snapshot`)."""

    @abc.abstractmethod
    def delete_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        """Remove the writable layer and everything it wrote.

        *template* is None when the template's record was lost (moved to
        lost+found by the store): remove what belongs to the snapshot all
        the same, as far as it can be found from the snapshot alone.
        """
