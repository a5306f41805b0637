"""Boot traces: parsing QEMU's trace log, the file format, replay plans."""

import json
import os

import pytest

from thunder_lab.cmd import trace as trace_cmd
from thunder_agent import exception
from thunder_lab import exception as lab_exception
from thunder_agent import trace as trace_mod
from thunder_lab import trace_recorder

SHA = 'ab' * 32
T0 = 1700000000.0


def _line(t, event, args, tid=4242):
    seconds = T0 + t
    return '%d@%d.%06d:%s %s' % (tid, int(seconds),
                                 round((seconds % 1) * 1e6), event, args)


def _read(t, req, sector, nsectors):
    return _line(t, 'virtio_blk_handle_read',
                 'vdev 0x55d0 req %s sector %d nsectors %d'
                 % (req, sector, nsectors))


def _write(t, req, sector, nsectors):
    return _line(t, 'virtio_blk_handle_write',
                 'vdev 0x55d0 req %s sector %d nsectors %d'
                 % (req, sector, nsectors))


def _done(t, req):
    return _line(t, 'virtio_blk_rw_complete', 'vdev 0x55d0 req %s ret 0'
                 % req)


def make_trace(reads, size=1 << 20):
    return trace_mod.Trace(size, SHA, [trace_mod.Read(*r) for r in reads])


def test_parse_qemu_log_reads_latencies_and_shadowed_reads():
    lines = [
        'qemu-system-x86_64: some warning without an event',
        _read(0.5, '0x1', 0, 1),
        _done(0.5002, '0x1'),
        _read(1.0, '0x1', 8, 64),          # req pointer reused
        _read(1.0001, '0x2', 2048, 8),     # concurrent with the one above
        _done(1.003, '0x2'),
        _done(1.004, '0x1'),
        _write(2.0, '0x3', 4096, 16),
        _done(2.001, '0x3'),
        _read(2.5, '0x3', 4100, 4),        # inside what the guest wrote
        _done(2.5001, '0x3'),
        _read(2.6, '0x4', 4090, 16),       # only partly written: kept
    ]
    reads, shadowed, writes = trace_recorder.parse_qemu_log(lines, T0)
    assert [(r.offset, r.length) for r in reads] == [
        (0, 512), (8 * 512, 64 * 512), (2048 * 512, 8 * 512),
        (4090 * 512, 16 * 512)]
    assert shadowed == 1 and writes == 1
    assert reads[0].t == pytest.approx(0.5, abs=1e-5)
    assert reads[0].latency == pytest.approx(0.0002, abs=1e-5)
    assert reads[1].latency == pytest.approx(0.004, abs=1e-5)
    assert reads[2].latency == pytest.approx(0.0029, abs=1e-5)
    # Never completed (the recording stopped): latency unknown.
    assert reads[3].latency is None


def test_figures_and_extents():
    trace = make_trace([(0.1, 0, 512), (0.2, 100, 1000),
                        (0.3, 70000, 10), (0.4, 0, 512)])
    assert trace.total_bytes() == 512 + 1000 + 10 + 512
    assert trace.extents() == [(0, 1100), (70000, 10)]
    assert trace.unique_bytes() == 1110
    # Widened to the cache's blocks: [0, 64K) and [64K, 128K).
    assert trace.extents(65536) == [(0, 131072)]
    assert trace.unique_bytes(65536) == 131072
    summary = trace.summary(4096)
    assert summary['reads'] == 4
    assert summary['working_set_bytes'] == 4096 * 2
    assert summary['working_set_fraction'] == pytest.approx(8192 / (1 << 20))


def test_merge_extents_clips_at_the_image_end():
    assert trace_mod.merge_extents([(1000, 100)], 4096, limit=3000) == [
        (0, 3000)]
    assert trace_mod.merge_extents([(10, 0), (5, 5), (0, 5)]) == [(0, 10)]


def test_save_and_load_round_trip(tmp_path):
    trace = make_trace([(0.01, 0, 512, 0.001), (0.5, 4096, 8192, None)])
    trace.meta.update(image='disk.raw', stop='poweroff')
    path = str(tmp_path / 'boot.trace')
    trace.save(path)
    lines = open(path).read().splitlines()
    header = json.loads(lines[0])
    assert header['format'] == 'thunder-boot-trace'
    assert header['version'] == 1
    assert header['reads'] == 2 and header['image_sha256'] == SHA
    assert json.loads(lines[1]) == {'t': 0.01, 'off': 0, 'len': 512,
                                    'lat': 0.001}
    assert 'lat' not in json.loads(lines[2])
    loaded = trace_mod.load(path)
    assert loaded == trace
    assert loaded.meta['stop'] == 'poweroff'
    assert loaded.duration_s == pytest.approx(0.5)


def _write_lines(path, header, entries):
    with open(path, 'w') as f:
        for entry in [header] + entries:
            f.write((entry if isinstance(entry, str) else json.dumps(entry))
                    + '\n')
    return str(path)


HEADER = {'format': 'thunder-boot-trace', 'version': 1,
          'image_size': 1 << 20, 'image_sha256': SHA}
READ = {'t': 0.1, 'off': 0, 'len': 512}


@pytest.mark.parametrize('header,entries,reason', [
    ({'format': 'other'}, [READ], 'not a thunder-boot-trace'),
    (dict(HEADER, version=7), [READ], 'unsupported version'),
    (dict(HEADER, image_size=0), [READ], 'image_size'),
    (dict(HEADER, image_sha256='xyz'), [READ], 'image_sha256'),
    (HEADER, [], 'no reads'),
    (HEADER, ['{not json'], 'not JSON'),
    (HEADER, [[1, 2]], 'not a JSON object'),
    (HEADER, [{'t': 0.1, 'off': 0}], 'must have t, off, len'),
    (HEADER, [dict(READ, extra=1)], 'must have t, off, len'),
    (HEADER, [dict(READ, len=0)], 'length'),
    (HEADER, [dict(READ, off=-1)], 'offset'),
    (HEADER, [dict(READ, off=(1 << 20) - 100)], 'beyond the image'),
    (HEADER, [dict(READ, t=float('nan'))], 't must be'),
    (HEADER, [dict(READ, t=True)], 't must be'),
    (HEADER, [dict(READ, lat=-1)], 'latency'),
    (HEADER, [dict(READ, t=2), dict(READ, t=1)], 'out of order'),
    (dict(HEADER, reads=3), [READ], 'announces 3 reads'),
])
def test_bad_trace_files_are_refused(tmp_path, header, entries, reason):
    path = _write_lines(tmp_path / 't', header, entries)
    with pytest.raises(exception.InvalidTrace) as e:
        trace_mod.load(path)
    assert reason in str(e.value)
    assert path in str(e.value)


def test_unreadable_and_empty_files_are_refused(tmp_path):
    with pytest.raises(exception.InvalidTrace):
        trace_mod.load(str(tmp_path / 'missing'))
    (tmp_path / 'empty').write_text('')
    with pytest.raises(exception.InvalidTrace):
        trace_mod.load(str(tmp_path / 'empty'))


def test_invalid_trace_is_not_saved(tmp_path):
    path = tmp_path / 'bad.trace'
    trace = make_trace([(0.1, (1 << 20) - 1, 2)])
    with pytest.raises(exception.InvalidTrace):
        trace.save(str(path))
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_check_image():
    trace = make_trace([(0.1, 0, 512)])
    trace_mod.check_image(trace, 1 << 20, SHA)
    with pytest.raises(exception.InvalidTrace):
        trace_mod.check_image(trace, 2 << 20)
    with pytest.raises(exception.InvalidTrace):
        trace_mod.check_image(trace, 1 << 20, 'cd' * 32)


def test_replay_plan_keeps_concurrency_and_think_times():
    trace = make_trace([
        (0.5, 0, 512, 0.01),        # 0: first read after 0.5 s of BIOS
        (0.6, 512, 512, 0.10),      # 1: issued together with 2
        (0.6, 1024, 512, 0.05),     # 2
        (0.8, 2048, 512, 0.01),     # 3: after 1 and 2 completed (0.7)
        (0.805, 4096, 512, 0.01),   # 4: right after 3, 3 still running
    ])
    steps = trace.replay_plan()
    assert [s.waits_for for s in steps] == [(), (0,), (), (1, 2), ()]
    assert [round(s.think_s, 6) for s in steps] == [
        0.5, 0.09, 0.0, 0.1, 0.005]
    assert trace.think_s() == pytest.approx(0.695)


def test_replay_plan_without_latencies_is_sequential():
    trace = make_trace([(0.1, 0, 512), (0.3, 512, 512), (0.35, 0, 512)])
    steps = trace.replay_plan()
    assert [s.waits_for for s in steps] == [(), (0,), (1,)]
    assert [round(s.think_s, 6) for s in steps] == [0.1, 0.2, 0.05]


def test_record_refuses_bad_input_before_booting(tmp_path):
    with pytest.raises(lab_exception.TraceRecordFailed):
        trace_recorder.record(str(tmp_path / 'missing.raw'))
    disk = tmp_path / 'disk.raw'
    disk.write_bytes(b'\0' * 4096)
    for kwargs in ({'timeout': 0}, {'idle_timeout': -1},
                   {'memory_mb': 16}, {'accel': 'hax'}):
        with pytest.raises(exception.InvalidInput):
            trace_recorder.record(str(disk), **kwargs)


def test_show_command(tmp_path, capsys):
    trace = make_trace([(0.1, 0, 4096, 0.001), (0.2, 65536, 4096, 0.001)])
    path = trace.save(str(tmp_path / 'b.trace'))
    assert trace_cmd.main(['show', path]) == 0
    out = capsys.readouterr().out
    assert 'reads:        2' in out
    assert 'unique bytes: 8192' in out
    assert 'working set:  131072 bytes' in out
    assert trace_cmd.main(['show', '--json', path]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['unique_bytes'] == 8192
    assert summary['image_sha256'] == SHA
    (tmp_path / 'bad').write_text('nonsense\n')
    assert trace_cmd.main(['show', str(tmp_path / 'bad')]) == 1
    assert 'Invalid boot trace' in capsys.readouterr().err
