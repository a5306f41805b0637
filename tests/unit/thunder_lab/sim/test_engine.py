"""The simulator's physics on small, checkable cases."""

import pytest

from thunder_agent import exception
from thunder_lab.sim import compare
from thunder_lab.sim import engine
from thunder_lab.sim import model
from thunder_agent import trace as trace_mod

KIB = 1024
MIB = 1 << 20
SHA = '1' * 64
W = 100e6                  # bits per second


def boot_trace(image=64 * MIB, reads=120):
    """Sequential-ish boot: 32 KiB reads over 12 MiB, 10 ms think."""
    out = []
    for i in range(reads):
        offset = (i * 97 * 32 * KIB) % (12 * MIB)
        out.append(trace_mod.Read(0.01 * (i + 1), offset, 32 * KIB,
                                  0.0001))
    return trace_mod.Trace(image, SHA, out)


@pytest.fixture(scope='module')
def workload():
    return model.Workload(boot_trace())


def run(workload, mode, hosts, **kwargs):
    kwargs.setdefault('request_latency_s', 0.0005)
    config = model.SimConfig(mode=mode, hosts=hosts, bandwidth_bps=W,
                             **kwargs)
    return engine.simulate(config, workload)


def test_workload_units_partition_the_working_set(workload):
    trace = workload.trace
    assert workload.unit_bytes == trace.unique_bytes(64 * KIB)
    offsets = sorted(workload.units)
    for (a, la), (b, _) in zip(offsets, offsets[1:]):
        assert a + la <= b
    for read, units in zip(trace.reads, workload.read_units):
        covered = trace_mod.merge_extents(workload.units[u] for u in units)
        start = read.offset // (64 * KIB) * (64 * KIB)
        assert any(s <= start and read.end <= s + n for s, n in covered)


def test_full_copy_shares_the_origin_link(workload):
    image = workload.image_bytes
    warm = engine.warm_boot_s(workload, model.SimConfig(
        mode='full-copy', hosts=1, bandwidth_bps=W))
    for hosts in (1, 4):
        result = run(workload, 'full-copy', hosts)
        copy_s = hosts * image * 8 / (W * 0.97)
        assert result.storm_s == pytest.approx(copy_s + warm, rel=1e-6)
        assert result.origin_bytes == pytest.approx(hosts * image * 1.003,
                                                    rel=1e-6)


def test_origin_bytes_direct_grow_thunder_do_not(workload):
    wire = workload.unit_bytes * 1.003
    for hosts in (1, 3, 9):
        direct = run(workload, 'direct', hosts)
        thunder = run(workload, 'thunder', hosts, fan_out=2)
        assert direct.origin_bytes == pytest.approx(hosts * wire, rel=1e-6)
        assert thunder.origin_bytes == pytest.approx(wire, rel=1e-6)
        # Each relay sends at most fan_out copies.
        assert thunder.max_link_bytes <= 2 * wire * 1.000001


def test_warm_boot_is_think_time_plus_local_reads(workload):
    config = model.SimConfig(mode='thunder', hosts=1, bandwidth_bps=W,
                             local_latency_s=0.001, miss_penalty_s=0.002)
    think = workload.trace.think_s()
    reads = len(workload.trace.reads)
    local = reads * (0.001 + 32 * KIB * 8 / config.local_bps)
    # warm_boot_s reads a local copy: local latency, nothing misses.
    assert engine.warm_boot_s(workload, config) == pytest.approx(
        think + local, rel=1e-6)


def test_lumped_and_per_host_runs_agree(workload):
    for mode in ('direct', 'thunder', 'thunder-prefetch', 'full-copy'):
        lumped = run(workload, mode, 23, fan_out=3)
        single = run(workload, mode, 23, fan_out=3, lump=False)
        assert lumped.classes < single.classes == 23
        for key in ('storm_s', 'p50_s', 'p99_s'):
            assert getattr(lumped, key) == pytest.approx(
                getattr(single, key), rel=1e-9), (mode, key)
        assert lumped.origin_bytes == single.origin_bytes
        assert lumped.max_link_bytes == single.max_link_bytes


def test_prefetch_and_relay_help(workload):
    kwargs = dict(request_latency_s=0.01, setup_s=0.2, vm_start_s=0.3)
    direct = run(workload, 'direct', 8, **kwargs)
    thunder = run(workload, 'thunder', 8, **kwargs)
    prefetched = run(workload, 'thunder-prefetch', 8, **kwargs)
    assert prefetched.storm_s < thunder.storm_s
    assert prefetched.origin_bytes == thunder.origin_bytes
    assert thunder.origin_bytes < direct.origin_bytes
    assert thunder.bound_s <= prefetched.storm_s
    assert thunder.depth == 4      # 1 + 2 + 4 + 1 with fan-out 2


def test_many_hosts_are_cheap(workload):
    result = run(workload, 'thunder', 3000, fan_out=4)
    assert result.vms == 3000
    assert result.classes < 100
    assert result.wall_s < 30


def test_p2p_fluid_model(workload):
    image = workload.image_bytes
    result = run(workload, 'p2p-copy', 8)
    # Eight peers and the seeder upload: the copy takes about 8/9 B/W,
    # bounded below by one B/W.
    assert result.storm_s >= image * 8 / (W * 0.97)


def test_scaled_trace_reaches_the_fraction():
    trace = boot_trace()
    scaled = model.scaled_trace(trace, 10 << 30, 0.05)
    assert scaled.image_size == 10 << 30
    fraction = scaled.unique_bytes() / scaled.image_size
    assert 0.04 <= fraction <= 0.055
    assert len(scaled.reads) == len(trace.reads)
    assert [r.t for r in scaled.reads] == [r.t for r in trace.reads]
    with pytest.raises(exception.InvalidInput):
        model.scaled_trace(trace, 10 << 30, 1.5)


@pytest.mark.parametrize('kwargs', [
    {'mode': 'teleport'}, {'hosts': 0}, {'fan_out': 0},
    {'bandwidth_bps': 0}, {'efficiency': 1.5}, {'request_latency_s': -1},
    {'miss_penalty_s': -0.1}, {'header_overhead': 1},
    {'hosts': True},
])
def test_bad_config_is_refused(kwargs, workload):
    args = dict(mode='thunder', hosts=2, bandwidth_bps=W)
    args.update(kwargs)
    with pytest.raises(exception.InvalidInput):
        engine.simulate(model.SimConfig(**args), workload)


def test_compare_recovers_a_known_request_delay(workload):
    """Records made by the simulator itself with known per-read costs
    (2 ms through a template, 7 ms more on a miss) and the costs the
    benchmark measures: the fit finds them back, the predictions match."""
    trace = workload.trace
    records = []
    for mode in ('full-copy', 'direct', 'thunder', 'thunder-prefetch'):
        for hosts in (1, 2, 4):
            setup = 0.0 if mode == 'full-copy' else 0.4
            config = model.SimConfig(
                mode=mode, hosts=hosts, bandwidth_bps=W,
                hit_penalty_s=0.002, miss_penalty_s=0.007, setup_s=setup,
                vm_start_s=0.2, link_burst_s=0.01,
                local_latency_s=0.0002, lump=False)
            result = engine.simulate(config, workload)
            boot = result.storm_s - setup - 0.2
            ready = {'h%d' % i: setup for i in range(1, hosts + 1)}
            if mode == 'full-copy':
                # Download done; the VM starts 0.2 s later.
                boot = engine.warm_boot_s(workload, config)
                ready = {h: result.storm_s - boot - 0.2 for h in ready}
            records.append({
                'mode': mode, 'hosts': hosts, 'vms': hosts,
                'vms_per_host': 1, 'bandwidth_mbit': W / 1e6,
                'fan_out': 2, 'chunk_bytes': 65536, 'link_burst_s': 0.01,
                'storm_s': result.storm_s, 'p50_s': result.p50_s,
                'p99_s': result.p99_s, 'origin_bytes': result.origin_bytes,
                'max_link_bytes': result.max_link_bytes,
                'warm_boot_s': trace.think_s() + len(trace.reads) * (
                    0.0002 + 32 * KIB * 8 / config.local_bps),
                'host_ready_s': ready,
                'vm_detail': [{'name': '%s-vm0' % h, 'host': h,
                               'latency_s': result.storm_s,
                               'boot_s': boot} for h in ready]})
    rows, (hit, miss), _, fitted = compare.compare(records, trace)
    assert [(r['mode'], r['hosts']) for r in fitted] == [
        ('thunder-prefetch', 1), ('thunder', 1)]
    assert hit == pytest.approx(0.002, rel=0.05)
    assert miss == pytest.approx(0.007, rel=0.05)
    worst = compare.summary(rows)
    for key, value in worst.items():
        assert value['max_error'] < 0.01, (key, value)


def test_idle_link_sends_its_bucket_at_once():
    """A shaped link that was idle sends up to its bucket instantly, then
    at its rate; a busy link has no bucket left."""
    sim = engine.Simulator()
    rate = 1e6
    sender = type('N', (), {'tx_bytes': 0})()
    receiver = type('N', (), {'rx_bytes': 0, 'per_parent': 1,
                              'down_rate': 1e9})()
    link = engine.Link(sim, sender, rate, burst=10000)
    done = []
    link.send(receiver, 8000, lambda: done.append(('small', sim.now)))
    sim.run()
    assert done == [('small', 0.0)]
    # 2000 bytes were left and 2 ms idle saved 2000 more: the other
    # 26000 take 26 ms.
    sim.at(0.002, link.send, receiver, 30000,
           lambda: done.append(('large', sim.now)))
    sim.run()
    assert done[1][0] == 'large'
    assert done[1][1] == pytest.approx(0.002 + 0.026)
    assert sender.tx_bytes == 38000 and receiver.rx_bytes == 38000


def test_p2p_seed_extra_grows_seed_upload_and_copy_time(workload):
    image = workload.image_bytes
    ideal = run(workload, 'p2p-copy', 8)
    real = run(workload, 'p2p-copy', 8, p2p_seed_extra=0.6)
    images = 1 + 0.6 * (1 - 1 / 8)
    wire = 1 + model.SimConfig.header_overhead
    assert real.origin_bytes == int(image * images * wire)
    assert ideal.origin_bytes == int(image * wire)
    # The seed's upload is the bottleneck: the copy grows with it.
    assert real.storm_s - ideal.storm_s == pytest.approx(
        image * (images - 1) / (W * 0.97 / 8), rel=0.01)


def test_compare_fits_the_p2p_seed_on_two_hosts():
    wire = 1 + model.SimConfig.header_overhead
    records = [{'mode': 'p2p-copy', 'hosts': h, 'image_bytes': 1000,
                'origin_bytes': 1000 * wire * (1 + 0.5 * (1 - 1 / h))}
               for h in (1, 4, 2)]
    extra, used = compare.calibrate_p2p(records)
    assert extra == pytest.approx(0.5)
    assert used == [records[2]]
    assert compare.calibrate_p2p(records[:1]) == (0.0, [])


def test_cpu_pool_shares_cores_among_reads():
    """Processor sharing: alone or within the core count a job runs at
    one core; beyond it the cores are split."""
    sim = engine.Simulator()
    pool = engine.CpuPool(sim, 2)
    done = {}
    for name in ('a', 'b'):
        pool.run(0.010, 1, lambda n=name: done.setdefault(n, sim.now))
    sim.run()
    assert done == {'a': pytest.approx(0.010), 'b': pytest.approx(0.010)}
    sim.at(1.0, lambda: [pool.run(0.010, 1, lambda n=n: done.setdefault(
        n, sim.now)) for n in ('c', 'd', 'e', 'f')])
    sim.run()
    # Four jobs on two cores: each at half speed.
    for name in 'cdef':
        assert done[name] == pytest.approx(1.020)


def test_shared_cpu_slows_a_crowded_storm(workload):
    alone = run(workload, 'thunder', 16, hit_penalty_s=0.002, lump=False)
    shared = run(workload, 'thunder', 16, hit_penalty_s=0.002, lump=False,
                 shared_cpu_cores=2)
    one = run(workload, 'thunder', 1, hit_penalty_s=0.002,
              shared_cpu_cores=2)
    assert shared.storm_s > alone.storm_s
    assert one.storm_s == pytest.approx(
        run(workload, 'thunder', 1, hit_penalty_s=0.002).storm_s)
    with pytest.raises(exception.InvalidInput):
        model.SimConfig(mode='thunder', hosts=1, bandwidth_bps=W,
                        shared_cpu_cores=0).validate()
