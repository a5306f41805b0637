"""The discrete-event engine.

Links are fluid and fair: each host has an uplink and a downlink of the
configured rate; the transfers on an uplink share it equally (weighted by
how many hosts a class stands for), each also capped by its receiver's
downlink share. An uplink is a token bucket like the emulated links' TBF
shapers: while idle it saves up to ``link_burst_s`` of its rate, and a
transfer that starts on an idle link sends that much at once. A
transfer's rate changes only when a transfer starts or ends on its link,
so events are transfer starts and ends, requests, and the VMs' reads.

A cache is copy-on-read at fetch-unit grain (see
:class:`thunder_lab.sim.model.Workload`): a host that misses a unit asks
its parent, which serves it if it has it, waits for it if it is already
fetching it, or fetches it from its own parent first — the unit is stored
and forwarded at every hop, as a qcow2 copy-on-read template does. Every
request costs ``request_latency_s`` per hop (``origin_latency_s`` at the
origin); a VM read through a template costs ``hit_penalty_s`` more, and
one that missed ``miss_penalty_s`` more again.
"""

import dataclasses
import heapq
import time

from thunder_lab.bench import metrics
from thunder_lab.sim import model
from thunder_lab.sim import tree as tree_mod

ABSENT, FETCHING, PRESENT = 0, 1, 2
DONE_BYTES = 1e-3


class Simulator:
    def __init__(self):
        self.now = 0.0
        self.queue = []
        self.seq = 0
        self.events = 0
        self.cpu = None

    def at(self, when, fn, *args):
        self.seq += 1
        heapq.heappush(self.queue, (when, self.seq, fn, args))

    def run(self):
        queue = self.queue
        while queue:
            when, _, fn, args = heapq.heappop(queue)
            self.now = when
            self.events += 1
            fn(*args)


class Flow:
    __slots__ = ('dst', 'size', 'remaining', 'weight', 'rate', 'on_done')

    def __init__(self, dst, size, weight, on_done):
        self.dst = dst
        self.size = size
        self.remaining = float(size)
        self.weight = weight
        self.rate = 0.0
        self.on_done = on_done


class Link:
    """A host's uplink: the transfers it sends, fairly shared."""

    def __init__(self, sim, node, rate, burst=0.0):
        self.sim = sim
        self.node = node
        self.rate = rate                # payload bytes per second
        self.burst = burst              # bucket size, bytes
        self.tokens = burst
        self.idle_since = 0.0
        self.flows = []
        self.last = 0.0
        self.version = 0
        self.into = {}                  # dst node -> flows to it

    def send(self, dst, size, on_done):
        self._advance()
        flow = Flow(dst, size, dst.per_parent, on_done)
        if not self.flows and self.burst:
            # A busy link drains its bucket; an idle one refills it.
            self.tokens = min(self.burst, self.tokens + self.rate * (
                self.sim.now - self.idle_since))
            taken = min(self.tokens, size * flow.weight)
            self.tokens -= taken
            flow.remaining -= taken / flow.weight
        self.flows.append(flow)
        self.into[dst] = self.into.get(dst, 0) + 1
        self._reschedule()

    def _advance(self):
        elapsed = self.sim.now - self.last
        if elapsed > 0:
            for flow in self.flows:
                flow.remaining -= flow.rate * elapsed
        self.last = self.sim.now

    def _reschedule(self):
        self.version += 1
        if not self.flows:
            return
        share = self.rate / sum(f.weight for f in self.flows)
        soonest = None
        for flow in self.flows:
            flow.rate = min(share, flow.dst.down_rate / self.into[flow.dst])
            left = max(0.0, flow.remaining) / flow.rate
            if soonest is None or left < soonest:
                soonest = left
        self.sim.at(self.sim.now + soonest, self._complete, self.version)

    def _complete(self, version):
        if version != self.version:
            return
        self._advance()
        done = [f for f in self.flows if f.remaining <= DONE_BYTES]
        if not done:
            self._reschedule()
            return
        self.flows = [f for f in self.flows if f.remaining > DONE_BYTES]
        if not self.flows:
            self.idle_since = self.sim.now
        for flow in done:
            self.into[flow.dst] -= 1
            if not self.into[flow.dst]:
                del self.into[flow.dst]
            # Per host of the class: one copy to each of its children.
            self.node.tx_bytes += flow.size * flow.weight
            flow.dst.rx_bytes += flow.size
        self._reschedule()
        for flow in done:
            flow.on_done()


class CpuPool:
    """The emulation's shared processors: per-read work of every VM runs
    here under processor sharing, a read using at most one core. On real
    hosts each has its own CPUs and this pool is not used."""

    def __init__(self, sim, cores):
        self.sim = sim
        self.cores = cores
        self.jobs = []              # [remaining work s, weight, on_done]
        self.last = 0.0
        self.version = 0

    def run(self, work, weight, on_done):
        self._advance()
        self.jobs.append([work, weight, on_done])
        self._reschedule()

    def _rate(self):
        return min(1.0, self.cores / sum(j[1] for j in self.jobs))

    def _advance(self):
        elapsed = self.sim.now - self.last
        if elapsed > 0 and self.jobs:
            rate = self._rate()
            for job in self.jobs:
                job[0] -= rate * elapsed
        self.last = self.sim.now

    def _reschedule(self):
        self.version += 1
        if self.jobs:
            left = max(0.0, min(j[0] for j in self.jobs)) / self._rate()
            self.sim.at(self.sim.now + left, self._complete, self.version)

    def _complete(self, version):
        if version != self.version:
            return
        self._advance()
        done = [j for j in self.jobs if j[0] <= 1e-12]
        self.jobs = [j for j in self.jobs if j[0] > 1e-12]
        self._reschedule()
        for job in done:
            job[2]()


class Node:
    """A host class (or the origin) with its cache."""

    def __init__(self, sim, config, workload, cls, parent):
        self.sim = sim
        self.config = config
        self.workload = workload
        self.cls = cls
        self.parent = parent
        self.is_origin = parent is None
        self.count = 1 if self.is_origin else cls.count
        self.per_parent = 1 if self.is_origin else cls.per_parent
        payload = config.efficiency / 8.0
        up = config.origin_bps if self.is_origin else config.bandwidth_bps
        self.link = Link(sim, self, up * payload,
                         burst=up / 8.0 * config.link_burst_s)
        self.down_rate = config.bandwidth_bps * payload
        n = len(workload.units)
        self.state = bytearray([PRESENT] * n if self.is_origin else n)
        self.waiters = {}
        self.tx_bytes = 0
        self.rx_bytes = 0
        # VMs read a template's export (agent modes) or a local copy.
        self.through_template = config.mode in ('direct', 'thunder',
                                                'thunder-prefetch')

    def need(self, unit, callback):
        """Call *callback* once this node has *unit*."""
        state = self.state[unit]
        if state == PRESENT:
            callback()
            return
        self.waiters.setdefault(unit, []).append(callback)
        if state == FETCHING:
            return
        self.state[unit] = FETCHING
        parent = self.parent
        size = self.workload.units[unit][1]
        latency = (self.config.origin_latency_s if parent.is_origin
                   else self.config.request_latency_s)
        self.sim.at(self.sim.now + latency,
                    parent.need, unit,
                    lambda: parent.link.send(self, size,
                                             lambda: self._arrived(unit)))

    def _arrived(self, unit):
        self.state[unit] = PRESENT
        for callback in self.waiters.pop(unit, ()):
            callback()

    def fill(self):
        """Everything local (a full copy)."""
        for unit in range(len(self.state)):
            self.state[unit] = PRESENT


class VM:
    """Replays the trace's plan on its node; reports its end time."""

    def __init__(self, sim, node, workload, config, on_done):
        self.sim = sim
        self.node = node
        self.steps = workload.steps
        self.read_units = workload.read_units
        self.config = config
        self.on_done = on_done
        n = len(self.steps)
        self.done_at = [None] * n
        self.missing = [0] * n
        self.missed = [False] * n
        self.left = n
        self.next = 0
        self.scheduled = False
        self.prev_issue = 0.0
        self.dependency_done = 0.0

    def start(self):
        self.prev_issue = self.dependency_done = self.sim.now
        self._pump()

    def _pump(self):
        while self.next < len(self.steps) and not self.scheduled:
            step = self.steps[self.next]
            for j in step.waits_for:
                if self.done_at[j] is None:
                    return
                if self.done_at[j] > self.dependency_done:
                    self.dependency_done = self.done_at[j]
            ready = max(self.prev_issue, self.dependency_done) + step.think_s
            if ready > self.sim.now:
                self.scheduled = True
                self.sim.at(ready, self._fire)
                return
            self._issue()

    def _fire(self):
        self.scheduled = False
        self._issue()
        self._pump()

    def _issue(self):
        index = self.next
        self.next += 1
        self.prev_issue = self.sim.now
        units = [u for u in self.read_units[index]
                 if self.node.state[u] != PRESENT]
        self.missing[index] = len(units)
        self.missed[index] = bool(units)
        if not units:
            self._local_read(index)
            return
        for unit in units:
            self.node.need(unit, lambda i=index: self._unit_ready(i))

    def _unit_ready(self, index):
        self.missing[index] -= 1
        if not self.missing[index]:
            self._local_read(index)

    def _local_read(self, index):
        length = self.steps[index].read.length
        config = self.config
        delay = config.local_latency_s + 8.0 * length / config.local_bps
        if self.node.through_template:
            delay += config.hit_penalty_s
        if self.missed[index]:
            delay += config.miss_penalty_s
        if self.sim.cpu is not None:
            self.sim.cpu.run(delay, self.node.count * config.vms_per_host,
                             lambda: self._read_done(index))
        else:
            self.sim.at(self.sim.now + delay, self._read_done, index)

    def _read_done(self, index):
        self.done_at[index] = self.sim.now
        self.left -= 1
        if not self.left:
            self.on_done(self.sim.now)
            return
        self._pump()


class Prefetcher:
    """Trace prefetch: the units in order, a few in flight."""

    def __init__(self, node, workload, concurrency):
        self.node = node
        self.units = len(workload.units)
        self.concurrency = concurrency
        self.next = 0
        self.in_flight = 0

    def start(self):
        self._pump()

    def _pump(self):
        while self.in_flight < self.concurrency and self.next < self.units:
            unit = self.next
            self.next += 1
            if self.node.state[unit] == PRESENT:
                continue
            self.in_flight += 1
            self.node.need(unit, self._done)

    def _done(self):
        self.in_flight -= 1
        self._pump()


def warm_boot_s(workload, config):
    """One VM alone on a local copy of the image."""
    config = dataclasses.replace(config, mode='full-copy', hosts=1)
    sim = Simulator()
    root = tree_mod.classes({'h1': tree_mod.ORIGIN})
    cls = root.children[0]
    origin = Node(sim, config, workload, root, None)
    node = Node(sim, config, workload, cls, origin)
    node.fill()
    result = []
    VM(sim, node, workload, config, result.append).start()
    sim.run()
    return result[0]


def simulate(config, workload, parent_of=None):
    """Run one storm; returns :class:`thunder_lab.sim.model.SimResult`."""
    config.validate()
    started = time.monotonic()
    mode = config.mode
    if parent_of is None:
        if mode in ('thunder', 'thunder-prefetch'):
            parent_of = tree_mod.build(config.hosts, config.policy,
                                       config.fan_out,
                                       config.origin_fan_out)
        else:
            parent_of = {'h%d' % i: tree_mod.ORIGIN
                         for i in range(1, config.hosts + 1)}
    # Hosts with their own start times are not alike any more.
    lump = config.lump and not (config.host_setup_s or
                                config.host_vm_start_s)
    root = tree_mod.classes(parent_of, lump=lump)
    sim = Simulator()
    if config.shared_cpu_cores:
        sim.cpu = CpuPool(sim, config.shared_cpu_cores)
    origin = Node(sim, config, workload, root, None)
    nodes = [origin]
    by_class = {root: origin}
    for cls in tree_mod.walk(root):
        node = Node(sim, config, workload, cls, by_class[cls.parent])
        by_class[cls] = node
        nodes.append(node)
    finished = []               # (time, weight)

    def boot(node):
        weight = node.count * config.vms_per_host
        VM(sim, node, workload, config,
           lambda t: finished.append((t, weight))).start()

    copy_s = None
    if mode == 'p2p-copy':
        copy_s = _p2p_copy_s(config, workload.image_bytes)
    for node in nodes[1:]:
        # A class's first host names its start times (all are alike).
        host = node.cls.hosts[0]
        setup, vm_start = config.setup_of(host), config.vm_start_of(host)
        if mode == 'full-copy':
            sim.at(setup, _full_copy, sim, node, workload, vm_start, boot)
        elif mode == 'p2p-copy':
            node.fill()
            sim.at(setup + copy_s + vm_start, boot, node)
        else:
            if mode == 'thunder-prefetch':
                sim.at(setup, Prefetcher(
                    node, workload, config.prefetch_concurrency).start)
            sim.at(setup + vm_start, boot, node)
    sim.run()
    latencies = []
    for when, weight in finished:
        latencies += [when] * weight
    wire = 1.0 + config.header_overhead
    if mode == 'p2p-copy':
        origin_bytes = workload.image_bytes * config.p2p_seed_images * wire
        max_link = origin_bytes
    else:
        origin_bytes = origin.tx_bytes * wire
        max_link = max(max(n.tx_bytes, n.rx_bytes) for n in nodes) * wire
    depth = (tree_mod.depth(parent_of)
             if mode in ('thunder', 'thunder-prefetch') else 1)
    bound_depth = metrics.kary_depth(config.hosts, config.fan_out,
                                     config.origin_fan_out)
    return model.SimResult(
        mode=mode, hosts=config.hosts,
        vms=config.hosts * config.vms_per_host,
        storm_s=max(latencies) if latencies else 0.0,
        p50_s=metrics.percentile(latencies, 50) or 0.0,
        p99_s=metrics.percentile(latencies, 99) or 0.0,
        origin_bytes=int(origin_bytes), max_link_bytes=int(max_link),
        image_bytes=workload.image_bytes,
        working_set_bytes=workload.working_set_bytes,
        bound_s=metrics.bound_s(warm_boot_s(workload, config),
                                workload.working_set_bytes,
                                config.bandwidth_bps, bound_depth,
                                config.chunk_bytes),
        depth=depth, classes=len(nodes) - 1, events=sim.events,
        wall_s=time.monotonic() - started)


def _full_copy(sim, node, workload, vm_start_s, boot):
    def copied():
        node.fill()
        sim.at(sim.now + vm_start_s, boot, node)
    node.parent.link.send(node, workload.image_bytes, copied)


def _p2p_copy_s(config, image_bytes):
    """Fluid BitTorrent: the swarm's upload capacity bounds the copy
    (Kumar and Ross): max(B/u_origin, B/d, H*B/(u_origin + H*u)), the
    seed's share grown by the copies it sends more than once."""
    payload = config.efficiency / 8.0
    up = config.bandwidth_bps * payload
    origin_up = config.origin_bps * payload
    hosts = config.hosts
    return max(image_bytes * config.p2p_seed_images / origin_up,
               image_bytes / up,
               hosts * image_bytes / (origin_up + hosts * up))
