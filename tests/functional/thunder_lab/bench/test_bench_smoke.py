"""A bounded thunder-bench run: every mode at H=1 and H=2, replay VMs.

Real everything: network namespaces with shaped links, nginx, libtorrent
peers, RabbitMQ, the coordinator, one thunder-agent per host, qemu-nbd
under every VM. The image is small and the trace short so that CI stays
within a few minutes; the figures are checked for consistency, not speed.
"""

import json
import os
import shutil

import pytest

from thunder_lab.bench import metrics
from thunder_lab.cmd import bench as bench_cmd
from thunder_lab.emulation import images
from thunder_agent import trace as trace_mod
from thunder_lab import trace_recorder

pytestmark = [pytest.mark.functional, pytest.mark.slow]

KIB = 1024
MIB = 1 << 20


@pytest.fixture
def small_workload(workdir):
    if os.geteuid() != 0:
        pytest.skip('the benchmark needs root (network namespaces)')
    for tool, package in (('socat', 'socat'), ('curl', 'curl'),
                          ('qemu-nbd', 'qemu-utils')):
        if not shutil.which(tool):
            pytest.skip('%s is not installed (Debian %s)' % (tool, package))
    if not shutil.which('nginx') and not os.path.exists('/usr/sbin/nginx'):
        pytest.skip('nginx is not installed (Debian nginx-light)')
    pytest.importorskip('libtorrent')
    pytest.importorskip('matplotlib')
    image = images.make_image(os.path.join(workdir, 'bench.raw'), 24 * MIB)
    size, sha = trace_recorder.image_digest(image)
    reads = []
    t = 0.05
    for i in range(60):
        # A short boot: 60 reads, 1.5 MiB, half a second of think time.
        reads.append(trace_mod.Read(t, (i * 389 * 4 * KIB) % (size - 32 * KIB),
                                    32 * KIB, 0.0002))
        t += 0.008
    path = os.path.join(workdir, 'bench.trace')
    trace_mod.Trace(size, sha, reads).save(path)
    return image, path


def test_all_modes_tiny_storm(workdir, small_workload, capsys):
    image, trace_path = small_workload
    out_json = os.path.join(workdir, 'bench.json')
    out_png = os.path.join(workdir, 'bench.png')
    code = bench_cmd.main([
        '--image', image, '--trace', trace_path, '--hosts', '1,2',
        '--bandwidth-mbit', '200', '--json', out_json, '--plot', out_png,
        '--vm-timeout', '120', '--workdir', os.path.join(workdir, 'w'),
        '--check'])
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0, printed
    document = json.load(open(out_json))
    records = document['records']
    assert document['meta']['problems'] == []
    assert sorted((r['mode'], r['hosts']) for r in records) == sorted(
        (m, h) for m in metrics.MODES for h in (1, 2))
    trace = trace_mod.load(trace_path)
    for r in records:
        assert set(metrics.REQUIRED_KEYS) <= set(r)
        assert r['checksums_ok'], r['errors']
        assert r['vms'] == r['hosts']
        assert r['image_bytes'] == 24 * MIB
        assert r['working_set_bytes'] == trace.unique_bytes()
        assert 0 < r['p50_s'] <= r['p99_s'] <= r['storm_s']
        assert r['bound_s'] >= r['warm_boot_s'] > 0
    by = {(r['mode'], r['hosts']): r for r in records}
    cached = trace.unique_bytes(64 * KIB)
    for h in (1, 2):
        # Whole image per host for full-copy; the working set for thunder,
        # once, whatever the number of hosts (headers: a few percent).
        assert by['full-copy', h]['origin_bytes'] >= h * 24 * MIB
        for mode in ('thunder', 'thunder-prefetch'):
            assert by[mode, h]['origin_bytes'] <= 1.10 * cached
        assert by['direct', h]['origin_bytes'] >= 0.9 * h * cached
    assert by['thunder', 2]['origin_bytes'] <= \
        1.05 * by['thunder', 1]['origin_bytes']
    assert by['thunder', 2]['tree_height'] == 2
    assert by['direct', 2]['tree_height'] == 1
    assert all(p['state'] == 'done' for p in
               by['thunder-prefetch', 2]['prefetch'].values())
    with open(out_png, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    for mode in metrics.MODES:
        assert mode in printed
