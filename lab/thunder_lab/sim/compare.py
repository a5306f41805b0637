"""Check the simulator against emulated storms (``thunder-bench --json``).

Every record of the benchmark is simulated with the record's own setup:
hosts, VMs, link rate, mode, fan-out, cache block, and the fixed costs the
benchmark measured on the way (template or download ready time per host,
VM start-up, one VM's boot on a warm local disk). One parameter is not
measured directly: what a VM read through a template's NBD export costs
beyond a local read, for a hit and for a miss (see
``SimConfig.hit_penalty_s`` and ``miss_penalty_s``). They are fitted once,
on the smallest ``thunder-prefetch`` and ``thunder`` storms, and then used
for every record; the other records are predictions.
"""

import statistics

from thunder_lab.sim import engine
from thunder_lab.sim import model
from thunder_lab.emulation import cluster

METRICS = ('storm_s', 'p50_s', 'p99_s', 'origin_bytes', 'max_link_bytes')
AGENT_MODES = ('direct', 'thunder', 'thunder-prefetch')


def _median(values, default=0.0):
    values = list(values)
    return statistics.median(values) if values else default


def config_for(record, trace, penalties=(0.0, 0.0), p2p_seed_extra=0.0):
    """A :class:`~thunder_lab.sim.model.SimConfig` reproducing the
    benchmark record, each host starting when it did in the benchmark.
    *penalties* are (hit, miss) seconds, see :func:`calibrate`."""
    mode = record['mode']
    ready = dict(record.get('host_ready_s') or {})
    starts = {}
    for d in record.get('vm_detail') or []:
        # From host ready (template made, or copy complete) to the VM's
        # first read: snapshot, disk attach.
        begin = d['latency_s'] - d['boot_s']
        starts.setdefault(d['host'], []).append(
            begin - ready.get(d['host'], 0.0))
    host_setup = {h: (t if mode in AGENT_MODES else 0.0)
                  for h, t in ready.items()}
    host_vm_start = {h: max(0.0, _median(v)) for h, v in starts.items()}
    reads = len(trace.reads)
    local_latency_s = max(0.0, (record.get('warm_boot_s', 0.0)
                                - trace.think_s()) / reads)
    hit, miss = penalties
    return model.SimConfig(
        mode=mode, hosts=record['hosts'],
        bandwidth_bps=record['bandwidth_mbit'] * 1e6,
        vms_per_host=record.get('vms_per_host', 1),
        fan_out=(record.get('fan_out', 2) if mode != 'direct' else 1),
        origin_fan_out=1,
        chunk_bytes=record.get('chunk_bytes', 65536),
        hit_penalty_s=hit, miss_penalty_s=miss,
        link_burst_s=record.get('link_burst_s', cluster.SHAPER_BURST_S),
        p2p_seed_extra=p2p_seed_extra,
        shared_cpu_cores=record.get('cpu_count'),
        setup_s=_median(host_setup.values()),
        vm_start_s=_median(host_vm_start.values()),
        host_setup_s=host_setup or None,
        host_vm_start_s=host_vm_start or None,
        local_latency_s=local_latency_s)


def tree_of(record):
    """The relay tree the benchmark's coordinator built, if recorded
    (hosts join in the order their agents asked, not by name)."""
    tree = record.get('tree')
    if record['mode'] not in ('thunder', 'thunder-prefetch') or not tree \
            or len(tree) != record['hosts'] or None in tree.values():
        return None
    return dict(tree)


def _smallest(records, mode):
    found = sorted((r for r in records if r['mode'] == mode),
                   key=lambda r: r['hosts'])
    return found[0] if found else None


def _fit(record, trace, workload, penalties, which, high=0.2, rounds=22):
    """Bisect penalty *which* (0 hit, 1 miss) to match the record's storm
    time, the other one fixed."""
    low, top = 0.0, high
    for _ in range(rounds):
        middle = (low + top) / 2
        trial = list(penalties)
        trial[which] = middle
        result = engine.simulate(config_for(record, trace, trial),
                                 workload, parent_of=tree_of(record))
        if result.storm_s < record['storm_s']:
            low = middle
        else:
            top = middle
    fitted = list(penalties)
    fitted[which] = (low + top) / 2
    return tuple(fitted)


def calibrate(records, trace):
    """Fit the two per-read costs of reading through a template:

    * the hit penalty, on the smallest ``thunder-prefetch`` storm (its
      reads nearly all hit);
    * the miss penalty, on the smallest ``thunder`` storm.

    They interact a little, so the fit goes round twice. Returns
    ((hit, miss) seconds, [the records used]).
    """
    prefetched = _smallest(records, 'thunder-prefetch')
    demand = _smallest(records, 'thunder') or _smallest(records, 'direct')
    penalties = (0.0, 0.0)
    used = [r for r in (prefetched, demand) if r is not None]
    if not used:
        return penalties, used
    workload = model.Workload(trace, used[0].get('chunk_bytes', 65536))
    for _ in range(2):
        if prefetched is not None:
            penalties = _fit(prefetched, trace, workload, penalties, 0)
        if demand is not None:
            penalties = _fit(demand, trace, workload, penalties, 1)
    return penalties, used


def calibrate_p2p(records):
    """Fit :attr:`SimConfig.p2p_seed_extra` on the smallest ``p2p-copy``
    storm of two hosts or more (what its seed uploaded). Returns (extra,
    [the record used])."""
    found = sorted((r for r in records
                    if r['mode'] == 'p2p-copy' and r['hosts'] >= 2),
                   key=lambda r: r['hosts'])
    if not found:
        return 0.0, []
    record = found[0]
    wire = 1.0 + model.SimConfig.header_overhead
    images = record['origin_bytes'] / (record['image_bytes'] * wire)
    extra = max(0.0, (images - 1.0) / (1.0 - 1.0 / record['hosts']))
    return extra, [record]


def compare(records, trace, penalties=None, p2p_seed_extra=None):
    """Simulate every record; returns (rows, (hit, miss) penalties, the
    p2p seed's extra images, the records these were fitted on). A row has
    the record's mode and hosts and, per metric, the benchmark's value,
    the simulator's and the relative error."""
    fitted = []
    if penalties is None:
        penalties, fitted = calibrate(records, trace)
    if p2p_seed_extra is None:
        p2p_seed_extra, used = calibrate_p2p(records)
        fitted += used
    workloads = {}
    rows = []
    for record in sorted(records, key=lambda r: (r['hosts'], r['mode'])):
        chunk = record.get('chunk_bytes', 65536)
        if chunk not in workloads:
            workloads[chunk] = model.Workload(trace, chunk)
        result = engine.simulate(
            config_for(record, trace, penalties, p2p_seed_extra),
            workloads[chunk], parent_of=tree_of(record))
        row = {'mode': record['mode'], 'hosts': record['hosts'],
               'fitted': any(record is r for r in fitted)}
        for key in METRICS:
            bench = record.get(key)
            sim = getattr(result, key)
            row[key] = {'bench': bench, 'sim': sim,
                        'error': (sim - bench) / bench if bench else None}
        rows.append(row)
    return rows, penalties, p2p_seed_extra, fitted


def summary(rows, max_hosts=16, limit=0.15):
    """Worst absolute relative error per metric over H <= *max_hosts*
    (the fitted record left out), and whether each is within *limit*."""
    worst = {}
    for key in METRICS:
        errors = [abs(r[key]['error']) for r in rows
                  if r['hosts'] <= max_hosts and not r['fitted']
                  and r[key]['error'] is not None]
        worst[key] = {'max_error': max(errors) if errors else None,
                      'mean_error': (sum(errors) / len(errors)
                                     if errors else None),
                      'within': bool(errors) and max(errors) <= limit}
    return worst


def summary_by_mode(rows, max_hosts=16):
    """{mode: {metric: worst absolute relative error}} over H <=
    *max_hosts*, fitted records left out."""
    out = {}
    for row in rows:
        if row['hosts'] > max_hosts or row['fitted']:
            continue
        worst = out.setdefault(row['mode'], {})
        for key in METRICS:
            error = row[key]['error']
            if error is not None:
                worst[key] = max(worst.get(key, 0.0), abs(error))
    return out
