"""``thunder-sim run`` and ``thunder-sim compare`` end to end."""

import json

from thunder_lab.cmd import sim as sim_cmd
from thunder_agent import trace as trace_mod

KIB = 1024
MIB = 1 << 20


def write_trace(path):
    reads = [trace_mod.Read(0.01 * (i + 1), (i * 131 * 64 * KIB) % (30 * MIB),
                            64 * KIB, 0.0001) for i in range(80)]
    return trace_mod.Trace(32 * MIB, 'e' * 64, reads).save(str(path))


def test_run_scaled_storm(tmp_path, capsys):
    trace = write_trace(tmp_path / 'boot.trace')
    out = tmp_path / 'sim.json'
    code = sim_cmd.main(['run', '--trace', trace, '--hosts', '1,64',
                         '--modes', 'direct,thunder,thunder-prefetch',
                         '--bandwidth-mbit', '10000', '--image-gib', '1',
                         '--working-set', '0.05', '--json', str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'thunder-prefetch' in printed
    records = json.load(open(out))['records']
    assert len(records) == 6
    by = {(r['mode'], r['hosts']): r for r in records}
    assert by['thunder', 64]['image_bytes'] == 1 << 30
    ws = by['thunder', 64]['working_set_bytes']
    assert 0.04 < ws / (1 << 30) < 0.055
    # Relaying: the origin sends the working set once, direct 64 times.
    assert by['thunder', 64]['origin_bytes'] < 1.2 * ws
    assert by['direct', 64]['origin_bytes'] > 60 * ws
    assert by['thunder-prefetch', 64]['storm_s'] <= \
        by['thunder', 64]['storm_s']


def test_compare_prints_errors(tmp_path, capsys):
    trace = write_trace(tmp_path / 'boot.trace')
    records = []
    for mode, hosts, storm, origin in (('thunder', 1, 3.0, 6 * MIB),
                                       ('thunder', 2, 3.2, 6 * MIB),
                                       ('full-copy', 2, 9.0, 64 * MIB)):
        records.append({
            'mode': mode, 'hosts': hosts, 'vms': hosts, 'vms_per_host': 1,
            'storm_s': storm, 'p50_s': storm, 'p99_s': storm,
            'origin_bytes': origin, 'max_link_bytes': origin,
            'working_set_bytes': 5 * MIB, 'image_bytes': 32 * MIB,
            'bound_s': 1.0, 'bandwidth_mbit': 100, 'fan_out': 2,
            'chunk_bytes': 65536, 'warm_boot_s': 0.9, 'checksums_ok': True,
            'host_ready_s': {'h%d' % i: 0.3 for i in range(1, hosts + 1)},
            'vm_detail': [{'name': 'h%d-vm0' % i, 'host': 'h%d' % i,
                           'latency_s': storm, 'boot_s': storm - 0.5}
                          for i in range(1, hosts + 1)]})
    bench = tmp_path / 'bench.json'
    bench.write_text(json.dumps({'records': records,
                                 'meta': {'trace': trace}}))
    out = tmp_path / 'cmp.json'
    assert sim_cmd.main(['compare', str(bench), '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    assert '(fitted on thunder H=1)' in printed
    assert 'storm_s' in printed and 'origin_bytes' in printed
    rows = json.load(open(out))['records']
    assert [(r['mode'], r['hosts']) for r in rows] == [
        ('thunder', 1), ('full-copy', 2), ('thunder', 2)]
    assert rows[0]['fitted'] and abs(rows[0]['storm_s']['error']) < 0.01


def test_compare_without_a_trace_is_an_error(tmp_path, capsys):
    bench = tmp_path / 'bench.json'
    bench.write_text(json.dumps({'records': [], 'meta': {}}))
    assert sim_cmd.main(['compare', str(bench)]) == 1
    assert 'names no trace' in capsys.readouterr().err


def test_compare_rejects_a_bad_core_count(tmp_path, capsys):
    trace = write_trace(tmp_path / 'boot.trace')
    bench = tmp_path / 'bench.json'
    bench.write_text(json.dumps({'records': [], 'meta': {'trace': trace}}))
    assert sim_cmd.main(['compare', str(bench),
                         '--shared-cpu-cores', '0']) == 1
    assert '--shared-cpu-cores must be a positive integer' in \
        capsys.readouterr().err
