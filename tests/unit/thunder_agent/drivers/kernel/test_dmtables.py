import pytest

from thunder_agent import exception
from thunder_agent.drivers.kernel import dmtables

IMAGE = '0f2b1a3c-5d4e-4f60-8a7b-9c8d7e6f5a4b'


def test_sectors_converts_and_refuses_partial_sectors():
    assert dmtables.sectors(32 * 1024 * 1024) == 65536
    for bad in (0, -512, 1000, 512.0, True, '512'):
        with pytest.raises(exception.InvalidDeviceTable):
            dmtables.sectors(bad)


def test_multipath_table_one_group_all_paths_queue_if_no_path():
    table = dmtables.multipath(65536, ['8:0', '8:16'])
    assert table == ('0 65536 multipath 1 queue_if_no_path 0 1 1 '
                     'round-robin 0 2 1 8:0 1 8:16 1')


def test_multipath_table_without_queueing():
    assert dmtables.multipath(8, ['/dev/sda'], queue_if_no_path=False) == (
        '0 8 multipath 0 0 1 1 round-robin 0 1 1 /dev/sda 1')


@pytest.mark.parametrize('paths', [[], ['8:0', '8:0'], ['sda'],
                                   ['8:0; rm -rf /'], '8:0', [None]])
def test_multipath_table_refuses_bad_paths(paths):
    with pytest.raises(exception.InvalidDeviceTable):
        dmtables.multipath(65536, paths)


def test_linear_concatenates_segments():
    assert dmtables.linear([('/dev/loop1', 0, 16), ('254:0', 0, 65536)]) \
        == '0 16 linear /dev/loop1 0\n16 65536 linear 254:0 0'


@pytest.mark.parametrize('segments', [
    [], [('/dev/loop1', -1, 16)], [('/dev/loop1', 0, 0)],
    [('/dev/loop1', 0)], [('relative/path', 0, 8)], 'x'])
def test_linear_refuses_bad_segments(segments):
    with pytest.raises(exception.InvalidDeviceTable):
        dmtables.linear(segments)


def test_bcache_backing_puts_local_superblock_area_first():
    table = dmtables.bcache_backing('/dev/loop3', '/dev/mapper/x-src', 2048)
    assert table.splitlines() == ['0 16 linear /dev/loop3 0',
                                  '16 2048 linear /dev/mapper/x-src 0']


def test_snapshot_table():
    assert dmtables.snapshot(65536, '/dev/mapper/t-tpl', '/dev/loop4') == \
        '0 65536 snapshot /dev/mapper/t-tpl /dev/loop4 P 8'
    assert dmtables.snapshot(8, '7:1', '7:2', persistent=False,
                             chunk_sectors=16) == '0 8 snapshot 7:1 7:2 N 16'


@pytest.mark.parametrize('chunk', [0, 4, 12, 7, True])
def test_snapshot_refuses_bad_chunk_size(chunk):
    with pytest.raises(exception.InvalidDeviceTable):
        dmtables.snapshot(8, '7:1', '7:2', chunk_sectors=chunk)


def test_cache_table():
    assert dmtables.cache(65536, '/dev/loop1', '/dev/loop2', '254:0', 128) \
        == '0 65536 cache /dev/loop1 /dev/loop2 254:0 128 1 writethrough ' \
           'smq 0'
    assert 'passthrough' in dmtables.cache(8, '7:1', '7:2', '7:3', 64,
                                           mode='passthrough')


@pytest.mark.parametrize('kwargs', [{'block_sectors': 32},
                                    {'block_sectors': 100},
                                    {'mode': 'writeback'},
                                    {'policy': 'lru'}])
def test_cache_table_refuses_bad_arguments(kwargs):
    args = dict(length=8, metadata='7:1', cache_device='7:2',
                origin='7:3', block_sectors=128)
    args.update(kwargs)
    with pytest.raises(exception.InvalidDeviceTable):
        dmtables.cache(**args)


def test_device_names():
    assert dmtables.device_name('thunder', 'tpl', IMAGE) == \
        'thunder-%s-tpl' % IMAGE
    assert dmtables.snapshot_name('tha', IMAGE) == 'tha-snap-%s' % IMAGE


@pytest.mark.parametrize('prefix,role,ident', [
    ('thunder', 'cow', IMAGE), ('Thunder', 'tpl', IMAGE),
    ('thunder', 'tpl', '../etc'), ('thunder', 'tpl', 'a' * 130),
    ('thunder', 'tpl', ''), ('', 'tpl', IMAGE)])
def test_device_names_refuse_bad_parts(prefix, role, ident):
    with pytest.raises(exception.InvalidDeviceTable):
        dmtables.device_name(prefix, role, ident)


def test_parse_multipath_status_healthy_and_failed():
    # Recorded from dmsetup status on Linux 6.1.
    healthy = '0 65536 multipath 2 0 0 0 1 1 A 0 1 0 8:0 A 0 '
    assert dmtables.parse_multipath_status(healthy) == {
        'queued_ios': 0, 'paths': [('8:0', True)]}
    failed = '0 32768 multipath 2 3 0 0 1 1 E 0 2 0 8:16 F 1 8:32 F 2 '
    assert dmtables.parse_multipath_status(failed) == {
        'queued_ios': 3, 'paths': [('8:16', False), ('8:32', False)]}


@pytest.mark.parametrize('text', ['', '0 8 linear 7:1 0',
                                  '0 8 multipath 2 0 0 0 1 1 A 0 1'])
def test_parse_multipath_status_refuses_other_text(text):
    with pytest.raises(exception.InvalidDeviceTable):
        dmtables.parse_multipath_status(text)


def test_parse_cache_status():
    # Recorded from dmsetup status of a dm-cache device on Linux 6.1.
    status = ('0 65536 cache 8 9/2048 128 159/1024 512 2638 0 0 0 159 0 2 '
              'writethrough no_discard_passdown 2 migration_threshold 2048 '
              'smq 0 rw - ')
    assert dmtables.parse_cache_status(status) == {
        'block_sectors': 128, 'used_blocks': 159, 'total_blocks': 1024,
        'read_hits': 512, 'read_misses': 2638, 'promotions': 159}
    with pytest.raises(exception.InvalidDeviceTable):
        dmtables.parse_cache_status('0 8 linear 7:1 0')
