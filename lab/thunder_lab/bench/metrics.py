"""Figures of a storm: latency percentiles, link bytes, the physical bound,
and the consistency checks a benchmark result must pass."""

import math
import os

MODES = ('full-copy', 'p2p-copy', 'direct', 'thunder', 'thunder-prefetch',
         'thunder-plain')
# thunder with its security off ([tls] enabled = False: plain NBD links,
# unsigned coordinator calls): the other side of the cost of security.
PLAIN_MODE = 'thunder-plain'
# Modes on agents.
AGENT_MODES = ('direct', 'thunder', 'thunder-prefetch', PLAIN_MODE)
# Keys every record of ``thunder-bench --json`` has.
REQUIRED_KEYS = ('mode', 'hosts', 'vms', 'storm_s', 'p50_s', 'p99_s',
                 'origin_bytes', 'working_set_bytes', 'image_bytes',
                 'bound_s')


def percentile(values, q):
    """The *q*-th percentile (0..100), linear between closest ranks."""
    values = sorted(values)
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError('q must be within 0..100')
    rank = (len(values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def kary_depth(hosts, fan_out, origin_fan_out=1):
    """Depth of a breadth-first filled tree of *hosts* nodes: at most
    *origin_fan_out* under the root, *fan_out* under any other node."""
    if hosts < 1:
        return 0
    depth, placed, level = 0, 0, origin_fan_out
    while placed < hosts:
        depth += 1
        placed += level
        level *= fan_out
    return depth


def bound_s(warm_boot_s, working_set_bytes, bandwidth_bps, depth,
            chunk_bytes):
    """T* = max(one VM alone on a warm cache, working set / W + depth x
    chunk / W): the working set has to cross the origin's link once and
    the last block has to be stored and forwarded at every hop."""
    if not bandwidth_bps:
        return warm_boot_s
    transfer = 8.0 * (working_set_bytes + depth * chunk_bytes) / \
        bandwidth_bps
    return max(warm_boot_s, transfer)


def cpu_times(path='/proc/stat'):
    """(busy, total) jiffies of all CPUs of this machine."""
    with open(path) as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is in user)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def cpu_busy(before, after):
    """Fraction of the machine's CPU time spent busy between two
    :func:`cpu_times` readings: a storm that saturates the CPUs measures
    the machine, not the data path."""
    busy = after[0] - before[0]
    total = after[1] - before[1]
    return round(busy / total, 3) if total > 0 else None


def process_cpu_s(pids):
    """CPU seconds (user + system, with reaped children's) the processes
    *pids* have used so far; a process gone meanwhile counts 0."""
    tick = os.sysconf('SC_CLK_TCK')
    total = 0
    for pid in pids:
        try:
            with open('/proc/%d/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        # utime stime cutime cstime: fields 14-17 of proc(5).
        total += sum(int(x) for x in fields[11:15])
    return total / tick


def link_bytes(before, after):
    """{host: [sent, received]} between two counter snapshots."""
    return {name: [after[name].tx_bytes - before[name].tx_bytes,
                   after[name].rx_bytes - before[name].rx_bytes]
            for name in after}


def max_link_bytes(links):
    """The busiest link direction of any host, origin included: what a
    link of that bandwidth has to carry."""
    return max((max(tx, rx) for tx, rx in links.values()), default=0)


def check(records, tolerance=1.10):
    """Problems with a benchmark result (an empty list when consistent).

    Checks: every record has the required keys with sane values; every VM
    read correct bytes; the thunder modes' origin bytes do not grow with
    the number of hosts (within *tolerance*); relaying never makes the
    origin send more than the hosts received.
    """
    problems = []
    for r in records:
        where = '%s H=%s' % (r.get('mode'), r.get('hosts'))
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            problems.append('%s: missing %s' % (where, ', '.join(missing)))
            continue
        if r['mode'] not in MODES:
            problems.append('%s: unknown mode' % where)
        for key in ('storm_s', 'p50_s', 'p99_s', 'bound_s'):
            if not isinstance(r[key], (int, float)) or r[key] < 0:
                problems.append('%s: bad %s %r' % (where, key, r[key]))
        if r.get('p50_s') is not None and r.get('p99_s') is not None and \
                not r['p50_s'] <= r['p99_s'] <= r['storm_s'] + 1e-6:
            problems.append('%s: p50 <= p99 <= storm does not hold' % where)
        if r['vms'] != r['hosts'] * r.get('vms_per_host', 1):
            problems.append('%s: %s VMs for %s hosts' % (
                where, r['vms'], r['hosts']))
        if r.get('checksums_ok') is not True:
            problems.append('%s: wrong or missing data in %s VM(s): %s' % (
                where, r.get('vms_failed', '?'),
                '; '.join(r.get('errors', [])[:3])))
        if r['working_set_bytes'] > r['image_bytes']:
            problems.append('%s: working set larger than the image' % where)
    for mode in ('thunder', 'thunder-prefetch'):
        series = sorted((r['hosts'], r['origin_bytes']) for r in records
                        if r.get('mode') == mode and 'origin_bytes' in r)
        if len(series) > 1:
            first = series[0][1]
            for hosts, origin in series[1:]:
                if origin > tolerance * first:
                    problems.append(
                        '%s: origin bytes grow with hosts: %d at H=%d vs '
                        '%d at H=%d' % (mode, origin, hosts, first,
                                        series[0][0]))
    return problems
