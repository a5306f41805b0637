"""What the simulator simulates: parameters and the workload.

The workload is a boot trace cut into *fetch units*: replaying the trace on
a cold cache, each read needs the cache blocks it touches; those it finds
missing are fetched as one request per contiguous run (as a copy-on-read
cache does). Every host replays the same trace, so every host has the same
units; a unit is the simulator's grain of transfer and caching.
"""

import dataclasses

from thunder_agent import exception
from thunder_agent import trace as trace_mod

MODES = ('full-copy', 'p2p-copy', 'direct', 'thunder', 'thunder-prefetch')
MIB = 1 << 20
GIB = 1 << 30


@dataclasses.dataclass
class SimConfig:
    """One storm. Rates are bits per second like the benchmark's."""
    mode: str
    hosts: int
    bandwidth_bps: float
    origin_bandwidth_bps: float | None = None
    vms_per_host: int = 1
    policy: str = 'kary'
    fan_out: int = 2
    # Children of the origin in the relay tree (thunder modes).
    origin_fan_out: int = 1
    chunk_bytes: int = 65536
    # Largest request a cache sends to its parent (longer runs split).
    max_request: int = 16 * MIB
    # Payload share of a link's rate a TCP stream gets through the shaper.
    efficiency: float = 0.97
    # Header bytes counted on a link per payload byte (with segmentation
    # offload, the counters see few, large packets).
    header_overhead: float = 0.003
    # Bucket of a link's shaper, in seconds of its rate: what an idle link
    # sends at once (the emulated links' TBF burst is 10 ms of the rate).
    # Hosts lumped into a class share the bucket evenly and stay in step,
    # so with a bucket, lumping is an approximation (compare does not
    # lump).
    link_burst_s: float = 0.0
    # Fixed delay a cache's request to its parent costs per hop (round
    # trip, server work).
    request_latency_s: float = 0.0005
    # The same for a request the origin serves.
    origin_latency_s: float = 0.0005
    # Extra delay of a VM read that missed its host's cache, on top of
    # the fetch: the copy-on-read write and the reply's path back through
    # the template's NBD server.
    miss_penalty_s: float = 0.0
    # Extra delay of every VM read through a template's NBD export (the
    # modes with agents), hit or miss.
    hit_penalty_s: float = 0.0
    # Host ready (template or download started) after storm start.
    setup_s: float = 0.0
    # From host ready (or copy complete) to the VM issuing its first read.
    vm_start_s: float = 0.0
    # Per-host values of the two above, {host: seconds}, e.g. measured by
    # the benchmark; hosts then get one class each (no lumping).
    host_setup_s: dict = None
    host_vm_start_s: dict = None
    # A VM's read served by its host (a local copy, or a cache hit).
    local_latency_s: float = 0.0001
    local_bps: float = 8e9
    prefetch_concurrency: int = 4
    # Extra images a BitTorrent seed uploads as its swarm grows: it sends
    # (1 + x (1 - 1/H)) images, pieces it sends to several peers before
    # they trade them. 0 is the ideal swarm; libtorrent 2.0 on the
    # emulated cluster measures about 0.6 (thunder-sim compare fits it).
    p2p_seed_extra: float = 0.0
    # The emulation runs every host on one machine: the VMs' per-read
    # costs (local_latency_s and the penalties) share this many cores.
    # None: every host has its own CPUs.
    shared_cpu_cores: int | None = None
    lump: bool = True

    def validate(self):
        if self.mode not in MODES:
            raise exception.InvalidInput(
                reason='mode must be one of %s' % ', '.join(MODES))
        for name in ('hosts', 'vms_per_host', 'fan_out', 'origin_fan_out',
                     'chunk_bytes', 'max_request', 'prefetch_concurrency'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or \
                    value < 1:
                raise exception.InvalidInput(
                    reason='%s must be a positive integer' % name)
        for name in ('bandwidth_bps', 'local_bps'):
            if not getattr(self, name) > 0:
                raise exception.InvalidInput(reason='%s must be > 0' % name)
        if self.origin_bandwidth_bps is not None and \
                not self.origin_bandwidth_bps > 0:
            raise exception.InvalidInput(
                reason='origin_bandwidth_bps must be > 0')
        if self.shared_cpu_cores is not None and (
                isinstance(self.shared_cpu_cores, bool) or
                not isinstance(self.shared_cpu_cores, int) or
                self.shared_cpu_cores < 1):
            raise exception.InvalidInput(
                reason='shared_cpu_cores must be a positive integer')
        if not 0 < self.efficiency <= 1:
            raise exception.InvalidInput(reason='efficiency in (0, 1]')
        if not 0 <= self.header_overhead < 1:
            raise exception.InvalidInput(reason='header_overhead in [0, 1)')
        for name in ('request_latency_s', 'origin_latency_s',
                     'miss_penalty_s', 'hit_penalty_s', 'setup_s',
                     'link_burst_s', 'p2p_seed_extra',
                     'vm_start_s',
                     'local_latency_s'):
            if getattr(self, name) < 0:
                raise exception.InvalidInput(reason='%s must be >= 0' % name)
        return self

    def setup_of(self, host):
        return (self.host_setup_s or {}).get(host, self.setup_s)

    def vm_start_of(self, host):
        return (self.host_vm_start_s or {}).get(host, self.vm_start_s)

    @property
    def origin_bps(self):
        return self.origin_bandwidth_bps or self.bandwidth_bps

    @property
    def p2p_seed_images(self):
        """Images the seed uploads in p2p-copy."""
        return 1.0 + self.p2p_seed_extra * (1.0 - 1.0 / self.hosts)


class Workload:
    """A trace as the simulator uses it.

    ``units``: list of (offset, length) in first-need order;
    ``read_units``: per trace read, the units it needs;
    ``steps``: the trace's replay plan (causality and think times).
    """

    def __init__(self, trace, chunk_bytes=65536, max_request=16 * MIB):
        self.trace = trace
        self.image_bytes = trace.image_size
        self.chunk = chunk_bytes
        self.steps = trace.replay_plan()
        self.units = []
        self.read_units = []
        owner = {}                   # block -> unit
        per_request = max(1, max_request // chunk_bytes)
        for read in trace.reads:
            needed = []
            run = []
            first = read.offset // chunk_bytes
            last = (read.end - 1) // chunk_bytes
            for block in range(first, last + 1):
                if block in owner:
                    if run:
                        needed.append(self._close(run, owner))
                        run = []
                    if owner[block] not in needed:
                        needed.append(owner[block])
                    continue
                run.append(block)
                if len(run) == per_request:
                    needed.append(self._close(run, owner))
                    run = []
            if run:
                needed.append(self._close(run, owner))
            self.read_units.append(tuple(needed))
        self.working_set_bytes = trace.unique_bytes()
        self.unit_bytes = sum(length for _, length in self.units)

    def _close(self, run, owner):
        index = len(self.units)
        offset = run[0] * self.chunk
        length = min(len(run) * self.chunk, self.image_bytes - offset)
        self.units.append((offset, length))
        for block in run:
            owner[block] = index
        return index


def scaled_trace(trace, image_bytes, working_set_fraction=None,
                 granularity=512):
    """The trace's boot on a bigger image: offsets and lengths stretched
    so that the working set is *working_set_fraction* of *image_bytes*
    (default: the trace's own fraction). Read count, order and timing are
    kept."""
    own = trace.unique_bytes()
    fraction = (own / trace.image_size if working_set_fraction is None
                else working_set_fraction)
    if not 0 < fraction <= 1:
        raise exception.InvalidInput(
            reason='working set fraction must be in (0, 1]')
    factor = fraction * image_bytes / own
    position = image_bytes / trace.image_size
    reads = []
    for r in trace.reads:
        offset = int(r.offset * position) // granularity * granularity
        length = max(granularity,
                     int(r.length * factor) // granularity * granularity)
        offset = min(offset, image_bytes - length)
        reads.append(trace_mod.Read(r.t, offset, length, r.latency))
    return trace_mod.Trace(image_bytes, trace.image_sha256, reads,
                           dict(trace.meta, scaled_from=trace.image_size))


@dataclasses.dataclass
class SimResult:
    mode: str
    hosts: int
    vms: int
    storm_s: float
    p50_s: float
    p99_s: float
    origin_bytes: int
    max_link_bytes: int
    image_bytes: int
    working_set_bytes: int
    bound_s: float
    depth: int
    classes: int
    events: int
    wall_s: float

    def record(self):
        return dataclasses.asdict(self)
