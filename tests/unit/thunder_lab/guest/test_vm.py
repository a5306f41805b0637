"""Argument handling of the guest runner and image builder (no QEMU run)."""

import os

import pytest

from thunder_agent import exception
from thunder_lab import exception as lab_exception
from thunder_lab.guest import vm as guest
from thunder_lab.guest import image as guest_image


def test_command_for_raw_file(tmp_path):
    disk = tmp_path / 'd,isk.raw'
    disk.write_bytes(b'\0' * 4096)
    cmd = guest.qemu_command({'path': str(disk), 'format': 'raw',
                              'options': {'cache': 'unsafe'}},
                             '/tmp/con.log', memory_mb=128,
                             extra_args=['-smp', '1'])
    assert cmd[0] == 'qemu-system-x86_64'
    assert cmd[cmd.index('-machine') + 1] == 'pc,accel=tcg'
    assert cmd[cmd.index('-m') + 1] == '128'
    assert cmd[cmd.index('-serial') + 1] == 'file:/tmp/con.log'
    # Commas in paths are doubled for QEMU's option parser.
    assert cmd[cmd.index('-drive') + 1] == (
        'file=%s,format=raw,if=virtio,cache=unsafe'
        % str(disk).replace(',', ',,'))
    assert cmd[-2:] == ['-smp', '1']


def test_command_for_blockdev_graph():
    nodes = [{'driver': 'file', 'filename': '/x', 'node-name': 'f'},
             {'driver': 'raw', 'file': 'f', 'node-name': 'top'}]
    cmd = guest.qemu_command({'blockdev': nodes}, '/tmp/c.log')
    assert cmd.count('-blockdev') == 2
    assert cmd[cmd.index('-device') + 1] == 'virtio-blk-pci,drive=top'


@pytest.mark.parametrize('disk', [
    None, 42, {'path': '/nonexistent/disk.raw', 'format': 'raw'},
    {'blockdev': [{'driver': 'raw'}]}, {'blockdev': []},
])
def test_bad_disk_is_refused(disk):
    with pytest.raises(exception.InvalidInput):
        guest.qemu_command(disk, '/tmp/c.log')


def test_bad_format_and_options_are_refused(tmp_path):
    disk = tmp_path / 'disk.img'
    disk.write_bytes(b'\0' * 4096)
    with pytest.raises(exception.UnsupportedFormat):
        guest.qemu_command({'path': str(disk), 'format': 'vmdk'}, '/c')
    with pytest.raises(exception.InvalidInput):
        guest.qemu_command({'path': str(disk), 'format': 'raw',
                            'options': {'cache': 'none,file=/etc/shadow'}},
                           '/c')
    with pytest.raises(exception.InvalidInput):
        guest.qemu_command(str(disk), '/c', memory_mb=8)


def test_missing_qemu_is_a_clear_error(tmp_path, monkeypatch):
    disk = tmp_path / 'disk.raw'
    disk.write_bytes(b'\0' * 4096)
    monkeypatch.setenv('PATH', str(tmp_path))
    with pytest.raises(lab_exception.ToolNotFound) as err:
        guest.start(str(disk))
    assert 'qemu-system-x86' in str(err.value)


def test_console_parsing(tmp_path):
    log = tmp_path / 'console.log'
    sha = 'ab' * 32
    log.write_bytes(b'\x1bc SeaBIOS\r\n[  1.0] noise\r\n'
                    b'THUNDER-BOOT-OK count=7 data=' + sha.encode() +
                    b'\r\n[  2.0] reboot: Power down\r\n')
    # A finished process standing in for QEMU: 'true' exits with 0.
    g = guest.Guest(['true'], str(log), timeout=30)
    result = g.wait()
    assert result.ok and result.marker_seen
    assert (result.boot_count, result.data_sha) == (7, sha)
    log.write_bytes(b'THUNDER-BOOT-FAIL stage=root reason=mount /proc\r\n')
    result = guest.Guest(['false'], str(log), timeout=30).wait()
    assert not result.marker_seen and result.returncode == 1
    assert result.failure == 'THUNDER-BOOT-FAIL stage=root reason=mount /proc'


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv('THUNDER_CACHE_DIR', str(tmp_path))
    assert guest_image.cache_dir() == os.path.join(str(tmp_path),
                                                   'test-image')
    assert guest_image.default_image_path(16).startswith(str(tmp_path))


@pytest.mark.parametrize('filler', [-1, 1.5, True, 10 ** 6])
def test_bad_filler_is_refused_before_any_work(filler, tmp_path,
                                               monkeypatch):
    monkeypatch.setenv('THUNDER_CACHE_DIR', str(tmp_path))
    with pytest.raises(exception.InvalidInput):
        guest_image.build(filler_mib=filler)
    assert os.listdir(tmp_path) == []


def test_data_is_deterministic():
    data = guest_image.data_bytes()
    assert len(data) == guest_image.DATA_SIZE
    assert data == guest_image.data_bytes()
    assert guest_image.expected_data_sha('/nonexistent') == \
        guest_image.expected_data_sha()
