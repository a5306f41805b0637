"""The bootable test image and the QEMU boot runner, end to end."""

import os
import shutil
import subprocess

import pytest

from thunder_lab import exception as lab_exception
from thunder_lab.guest import vm as guest
from thunder_lab.guest import image as guest_image

pytestmark = pytest.mark.functional

BOOT_TIMEOUT = 240


def _require_qemu():
    for program, package in ((guest.QEMU, 'qemu-system-x86'),
                             (guest.QEMU_IMG, 'qemu-utils')):
        if not shutil.which(program):
            pytest.skip('%s not installed (Debian package %s): run '
                        'tools/bootstrap.sh' % (program, package))


@pytest.fixture(scope='module')
def image():
    _require_qemu()
    try:
        manifest = guest_image.build()
    except (lab_exception.ToolNotFound, lab_exception.PackageFetchFailed) as e:
        pytest.skip('cannot build the test image here: %s' % e)
    return manifest


def _qcow2_overlay(base, path):
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base,
                    '-F', 'raw', path], check=True)
    return path


def _assert_booted(result, count, data_sha):
    assert result.ok, (result, open(result.console_log, 'rb').read()[-3000:])
    assert result.boot_count == count
    assert result.data_sha == data_sha


def test_image_is_small_and_cached(image):
    assert image['size'] <= 128 << 20
    assert image['size'] % 512 == 0
    assert guest_image.sha256_file(image['path']) == image['image_sha256']
    # The data file is what the generator makes, nothing else.
    assert image['data_sha256'] == guest_image.expected_data_sha()
    again = guest_image.build()
    assert again['built'] is False
    assert again['image_sha256'] == image['image_sha256']
    with open(image['path'], 'rb') as f:
        mbr = f.read(512)
    assert mbr[510:] == b'\x55\xaa'
    # Partition 1 active (syslinux's MBR boots it), partition 2 Linux.
    assert mbr[446] == 0x80 and mbr[446 + 4] == 0x0e
    assert mbr[462 + 4] == 0x83


def test_boot_raw_copy(image, tmp_path):
    disk = str(tmp_path / 'disk.raw')
    shutil.copyfile(image['path'], disk)
    result = guest.boot(disk, timeout=BOOT_TIMEOUT)
    _assert_booted(result, 1, guest.expected_data_sha(image['path']))
    assert os.path.exists(result.console_log)
    assert result.marker_s <= result.elapsed_s
    # The counter lives on the disk: the copy changed, the cache did not.
    assert guest_image.sha256_file(disk) != image['image_sha256']
    assert guest_image.sha256_file(image['path']) == image['image_sha256']


def test_boot_qcow2_overlay_twice_keeps_base(image, tmp_path):
    base = str(tmp_path / 'base.raw')
    shutil.copyfile(image['path'], base)
    before = guest_image.sha256_file(base)
    overlay = _qcow2_overlay(base, str(tmp_path / 'vm.qcow2'))
    first = guest.boot(overlay, timeout=BOOT_TIMEOUT)
    _assert_booted(first, 1, image['data_sha256'])
    second = guest.boot({'path': overlay, 'format': 'qcow2'},
                        timeout=BOOT_TIMEOUT)
    _assert_booted(second, 2, image['data_sha256'])
    assert guest_image.sha256_file(base) == before


def test_concurrent_boots(image, tmp_path):
    guests = []
    for i in range(2):
        overlay = _qcow2_overlay(image['path'],
                                 str(tmp_path / ('vm%d.qcow2' % i)))
        guests.append(guest.start(
            overlay, timeout=BOOT_TIMEOUT,
            console_log=str(tmp_path / ('console%d.log' % i))))
    results = guest.wait_all(guests)
    for result in results:
        _assert_booted(result, 1, image['data_sha256'])
    assert results[0].console_log != results[1].console_log
    assert guest_image.sha256_file(image['path']) == image['image_sha256']


def test_boot_reads_measured_through_copy_on_read(image, tmp_path):
    reads = guest.measure_boot_reads(image['path'], str(tmp_path),
                                     timeout=BOOT_TIMEOUT)
    _assert_booted(reads['result'], 1, image['data_sha256'])
    assert reads['image_size'] == image['size']
    # At least the kernel and the data file were read, not the whole disk.
    kernel_and_data = 4 << 20
    assert kernel_and_data < reads['read_bytes'] < image['size']
    assert sum(length for _, length in reads['extents']) == \
        reads['read_bytes']
    assert guest_image.sha256_file(image['path']) == image['image_sha256']


def test_unbootable_disk_times_out(tmp_path):
    _require_qemu()
    blank = str(tmp_path / 'blank.raw')
    with open(blank, 'wb') as f:
        f.truncate(1 << 20)
    result = guest.boot(blank, timeout=3)
    assert result.timed_out
    assert not result.marker_seen and result.boot_count is None
    assert result.returncode is None and not result.ok


@pytest.mark.slow
def test_rebuild_is_byte_identical(image, tmp_path):
    rebuilt = guest_image.build(output=str(tmp_path / 'rebuilt.raw'),
                                force=True)
    assert rebuilt['built'] is True
    assert rebuilt['image_sha256'] == image['image_sha256']
