"""Check the simulator against emulated storms (``thunder-bench --json``).

Every record of the benchmark is simulated with the record's own setup:
hosts, VMs, link rate, mode, fan-out, cache block, and the fixed costs the
benchmark measured on the way (template or download ready time per host,
VM start-up, one VM's boot on a warm local disk). One parameter is not
measured directly: the delay each NBD request costs per hop. It is fitted
once, on the smallest ``thunder`` storm, and then used for every record;
the other records are predictions.
"""

import statistics

from thunder_agent.sim import engine
from thunder_agent.sim import model

METRICS = ('storm_s', 'p50_s', 'p99_s', 'origin_bytes', 'max_link_bytes')
AGENT_MODES = ('direct', 'thunder', 'thunder-prefetch')


def _median(values, default=0.0):
    values = list(values)
    return statistics.median(values) if values else default


def config_for(record, trace, request_latency_s):
    """A :class:`~thunder_agent.sim.model.SimConfig` reproducing the
    benchmark record."""
    mode = record['mode']
    detail = record.get('vm_detail') or []
    ready = record.get('host_ready_s') or {}
    if mode in AGENT_MODES:
        setup_s = _median(ready.values())
        vm_start_s = max(0.0, _median(
            d['latency_s'] - d['boot_s'] for d in detail) - setup_s)
    else:
        setup_s = 0.0
        vm_start_s = max(0.0, _median(
            d['latency_s'] - d['boot_s'] - ready.get(d['host'], 0.0)
            for d in detail if d['host'] in ready))
    reads = len(trace.reads)
    local_latency_s = max(0.0, (record.get('warm_boot_s', 0.0)
                                - trace.think_s()) / reads)
    return model.SimConfig(
        mode=mode, hosts=record['hosts'],
        bandwidth_bps=record['bandwidth_mbit'] * 1e6,
        vms_per_host=record.get('vms_per_host', 1),
        fan_out=(record.get('fan_out', 2) if mode != 'direct' else 1),
        origin_fan_out=1,
        chunk_bytes=record.get('chunk_bytes', 65536),
        request_latency_s=request_latency_s, setup_s=setup_s,
        vm_start_s=vm_start_s, local_latency_s=local_latency_s)


def calibrate(records, trace, low=0.0, high=0.2, rounds=24):
    """Fit the per-hop request delay on the smallest thunder storm
    (storm time grows with it). Returns (seconds, the record used)."""
    candidates = sorted((r for r in records if r['mode'] == 'thunder'),
                        key=lambda r: r['hosts']) or sorted(
        (r for r in records if r['mode'] in AGENT_MODES),
        key=lambda r: r['hosts'])
    if not candidates:
        return model.SimConfig.request_latency_s, None
    target = candidates[0]
    workload = model.Workload(trace, target.get('chunk_bytes', 65536))
    for _ in range(rounds):
        middle = (low + high) / 2
        result = engine.simulate(config_for(target, trace, middle),
                                 workload)
        if result.storm_s < target['storm_s']:
            low = middle
        else:
            high = middle
    return (low + high) / 2, target


def compare(records, trace, request_latency_s=None):
    """Simulate every record; returns (rows, request_latency_s, fitted
    record). A row has the record's mode and hosts and, per metric, the
    benchmark's value, the simulator's and the relative error."""
    fitted = None
    if request_latency_s is None:
        request_latency_s, fitted = calibrate(records, trace)
    workloads = {}
    rows = []
    for record in sorted(records, key=lambda r: (r['hosts'], r['mode'])):
        chunk = record.get('chunk_bytes', 65536)
        if chunk not in workloads:
            workloads[chunk] = model.Workload(trace, chunk)
        result = engine.simulate(
            config_for(record, trace, request_latency_s), workloads[chunk])
        row = {'mode': record['mode'], 'hosts': record['hosts'],
               'fitted': record is fitted}
        for key in METRICS:
            bench = record.get(key)
            sim = getattr(result, key)
            row[key] = {'bench': bench, 'sim': sim,
                        'error': (sim - bench) / bench if bench else None}
        rows.append(row)
    return rows, request_latency_s, fitted


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
