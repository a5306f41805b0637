"""Benchmark figures, consistency checks and output formats."""

import json
import os
import struct

import pytest

from thunder_lab.bench import metrics
from thunder_lab.bench import report
from thunder_lab.bench import runner
from thunder_lab.cmd import bench as bench_cmd
from thunder_agent import exception
from thunder_lab.emulation import cluster

MIB = 1 << 20


def record(mode='thunder', hosts=2, **kwargs):
    r = {'mode': mode, 'hosts': hosts, 'vms': hosts, 'vms_per_host': 1,
         'storm_s': 10.0, 'p50_s': 8.0, 'p99_s': 9.9,
         'origin_bytes': 25 * MIB, 'working_set_bytes': 24 * MIB,
         'image_bytes': 100 * MIB, 'bound_s': 7.0, 'max_link_bytes': 50 * MIB,
         'checksums_ok': True, 'bandwidth_mbit': 100, 'vm': 'replay'}
    r.update(kwargs)
    return r


def test_percentile():
    assert metrics.percentile([3, 1, 2], 50) == 2
    assert metrics.percentile([1, 2, 3, 4], 50) == 2.5
    assert metrics.percentile(list(range(101)), 99) == 99
    assert metrics.percentile([5], 99) == 5
    assert metrics.percentile([], 50) is None
    with pytest.raises(ValueError):
        metrics.percentile([1], 101)


@pytest.mark.parametrize('hosts,fan_out,origin_fan_out,depth', [
    (0, 2, 1, 0), (1, 2, 1, 1), (2, 2, 1, 2), (3, 2, 1, 2), (4, 2, 1, 3),
    (6, 2, 1, 3), (7, 2, 1, 3), (8, 2, 1, 4), (16, 2, 1, 5),
    (16, 4, 1, 3), (16, 1024, 1024, 1), (10000, 2, 1, 14),
])
def test_kary_depth(hosts, fan_out, origin_fan_out, depth):
    assert metrics.kary_depth(hosts, fan_out, origin_fan_out) == depth


def test_bound():
    # 10 MiB working set at 80 Mbit/s = 1.05 s, plus 3 hops of 64 KiB.
    transfer = 8 * (10 * MIB + 3 * 65536) / 80e6
    assert metrics.bound_s(0.5, 10 * MIB, 80e6, 3, 65536) == pytest.approx(
        transfer)
    assert metrics.bound_s(6.0, 10 * MIB, 80e6, 3, 65536) == 6.0
    assert metrics.bound_s(6.0, 10 * MIB, None, 3, 65536) == 6.0


def test_link_bytes():
    before = {'origin': cluster.LinkCounters(100, 50, 1, 1),
              'h1': cluster.LinkCounters(10, 1000, 1, 1)}
    after = {'origin': cluster.LinkCounters(5100, 150, 9, 9),
             'h1': cluster.LinkCounters(4010, 6000, 9, 9)}
    links = metrics.link_bytes(before, after)
    assert links == {'origin': [5000, 100], 'h1': [4000, 5000]}
    assert metrics.max_link_bytes(links) == 5000


def test_check_accepts_a_consistent_result():
    records = [record(hosts=h, origin_bytes=25 * MIB + h)
               for h in (1, 2, 4)]
    records += [record('full-copy', hosts=h, origin_bytes=h * 100 * MIB)
                for h in (1, 2, 4)]
    assert metrics.check(records) == []


def test_check_finds_problems():
    problems = metrics.check([
        record(hosts=1),
        record(hosts=4, origin_bytes=60 * MIB),
        record('direct', checksums_ok=False, vms_failed=1,
               errors=['h1-vm0: wrong data']),
        record('p2p-copy', vms=3),
        record('full-copy', p50_s=12.0),
        record('teleport'),
        {'mode': 'thunder'},
    ])
    text = '\n'.join(problems)
    assert 'origin bytes grow with hosts' in text
    assert 'wrong data' in text
    assert '3 VMs for 2 hosts' in text
    assert 'p50 <= p99 <= storm' in text
    assert 'unknown mode' in text
    assert 'missing' in text


def test_table_and_json(tmp_path):
    records = [record(hosts=2), record('full-copy', hosts=2,
                                       origin_bytes=200 * MIB),
               record(hosts=1, checksums_ok=False)]
    text = report.table(records)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ['mode', 'H', 'VMs']
    # Sorted by hosts, then in the order of the modes.
    modes = [row.split()[0] for row in lines[2:5]]
    assert modes == ['thunder', 'full-copy', 'thunder']
    assert 'BAD' in lines[2] and lines[3].rstrip().endswith('ok')
    assert '200.0' in lines[3]
    assert 'working set 24.0 MiB (24.0 %)' in text
    path = str(tmp_path / 'out.json')
    report.write_json(records, path, {'argv': ['--hosts', '1,2']})
    document = json.load(open(path))
    assert document['meta']['argv'] == ['--hosts', '1,2']
    assert report.load_json(path) == records
    for r in document['records']:
        assert set(metrics.REQUIRED_KEYS) <= set(r)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip('matplotlib')
    records = []
    for mode, scale in (('full-copy', 100), ('thunder', 1)):
        for h in (1, 2, 4):
            records.append(record(mode, hosts=h, storm_s=5.0 + h * scale / 10,
                                  origin_bytes=h * scale * MIB))
    path = str(tmp_path / 'plot.png')
    report.plot(records, path, title='test')
    with open(path, 'rb') as f:
        header = f.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = struct.unpack('>II', header[16:24])
    assert width > 800 and height > 400
    assert os.path.getsize(path) > 20000


def test_bench_config_validation(tmp_path):
    image = tmp_path / 'disk.raw'
    image.write_bytes(b'\0' * 4096)
    good = dict(image=str(image), trace=None, hosts=[1, 2])
    runner.BenchConfig(**good).validate()
    for bad in ({'image': '/nonexistent'}, {'hosts': []}, {'hosts': [0]},
                {'hosts': [1, 300]}, {'vms_per_host': 0},
                {'bandwidth_mbit': 0}, {'modes': ('full-copy', 'magic')},
                {'vm': 'imaginary'}, {'fan_out': 0}):
        with pytest.raises(exception.InvalidInput):
            runner.BenchConfig(**dict(good, **bad)).validate()


def test_cli_argument_parsing(capsys):
    assert bench_cmd._int_list('1,2,4') == [1, 2, 4]
    assert bench_cmd._modes('all') == metrics.MODES
    assert bench_cmd._modes('thunder,direct') == ('thunder', 'direct')
    for bad in ('x', ''):
        with pytest.raises(Exception):
            bench_cmd._int_list(bad)
    with pytest.raises(Exception):
        bench_cmd._modes('thunder,warp')
    with pytest.raises(SystemExit):
        bench_cmd.main(['--modes', 'warp'])
    assert 'modes are' in capsys.readouterr().err


def test_progress_line():
    counters = {'origin': cluster.LinkCounters(0, 0, 0, 0)}
    progress = runner.Progress('thunder H=2', 4, lambda: counters,
                               out=open(os.devnull, 'w'))
    progress.base = 0
    counters['origin'] = cluster.LinkCounters(3 * MIB, 0, 0, 0)
    progress.set_phase('h1', 'booting')
    progress.set_phase('h2', 'template')
    progress.vm_done(True)
    progress.vm_done(False)
    line = progress.line()
    assert '[thunder H=2]' in line
    assert 'VMs booted 2/4 (1 failed)' in line
    assert 'origin sent 3.0 MiB' in line
    assert 'booting:1 template:1' in line


def test_cpu_busy_counts_idle_and_iowait_as_idle(tmp_path):
    stat = tmp_path / 'stat'
    # user nice system idle iowait irq softirq steal
    stat.write_text('cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n')
    before = metrics.cpu_times(str(stat))
    assert before == (150, 1000)
    stat.write_text('cpu  400 0 150 1100 150 0 0 0 0 0\n')
    after = metrics.cpu_times(str(stat))
    assert metrics.cpu_busy(before, after) == 0.5
    assert metrics.cpu_busy(after, after) is None


def test_table_shows_cpu_busy():
    text = report.table([record(cpu_busy=0.973)])
    header, _, row = text.splitlines()[:3]
    assert 'CPU %' in header
    assert row.split()[-3] == '97'


def test_table_shows_the_data_plane_cost():
    text = report.table([record(cpu_busy=0.5, cpu_s_per_gib=3.456)])
    header, _, row = text.splitlines()[:3]
    assert 'dp CPU s/GiB' in header
    assert row.split()[-2] == '3.46'


def test_process_cpu_s_counts_this_process_and_skips_gone_ones():
    own = metrics.process_cpu_s([os.getpid()])
    sum(i * i for i in range(200000))
    assert metrics.process_cpu_s([os.getpid()]) >= own
    assert metrics.process_cpu_s([2 ** 22 + 12345]) == 0
