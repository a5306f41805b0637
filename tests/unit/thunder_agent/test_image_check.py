"""Image safety checks on hand-made headers: the qcow2 fields Nova's
format_inspector checks, format mismatches, what qemu-img info reports."""

import json
import os
import struct
import subprocess

import pytest

from thunder_agent import exception
from thunder_agent import image_check

SIZE = 64 << 20


def qcow2(version=3, backing=0, features=0):
    """The first page of a qcow2 image (64 KiB clusters)."""
    header = struct.pack('>4sIQIIQ', b'QFI\xfb', version, backing,
                         0 if not backing else 12, 16, SIZE)
    header = header.ljust(72, b'\0') + struct.pack('>Q', features)
    return header.ljust(4096, b'\0')


def protective_mbr():
    """An MBR with one 0xEE partition: a GPT disk, as raw disks are."""
    entry = struct.pack('<B3BB3BII', 0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF,
                        1, SIZE // 512 - 1)
    mbr = bytearray(512)
    mbr[446:462] = entry
    mbr[510:512] = b'\x55\xaa'
    return bytes(mbr) + b'EFI PART'.ljust(3584, b'\0')


# Incompatible feature bits: 0 dirty, 1 corrupt, 2 external data file,
# 3 compression type; 4 (extended L2) and up are unknown to the inspector.
@pytest.mark.parametrize('head, claimed, words', [
    (qcow2(backing=512), 'qcow2', 'backing_file'),
    (qcow2(features=1 << 2), 'qcow2', 'data_file'),
    (qcow2(features=1 << 4), 'qcow2', 'unknown_features'),
    (qcow2(features=1 << 5), 'qcow2', 'unknown_features'),
    (qcow2(features=1 << 40), 'qcow2', 'unknown_features'),
    (qcow2(version=1), 'qcow2', 'unknown_features'),
    # A raw image that is really a qcow2 (with or without a backing file):
    # the next tool that probes its format would follow the header.
    (qcow2(), 'raw', 'content is qcow2, not raw'),
    (qcow2(backing=512), 'raw', 'content is qcow2, not raw'),
    (bytes(4096), 'qcow2', 'content is raw, not qcow2'),
    # Other formats claimed raw.
    (b'KDMV' + bytes(4092), 'raw', 'content is vmdk, not raw'),
    (b'conectix' + bytes(4088), 'raw', 'content is vhd, not raw'),
    (b'vhdxfile' + bytes(4088), 'raw', 'content is vhdx, not raw'),
    (b'QED\0' + bytes(4092), 'raw', 'content is qed, not raw'),
    (b'LUKS\xba\xbe' + bytes(4090), 'raw', 'content is luks, not raw'),
    (bytes(4096), 'vmdk', 'cannot be inspected'),
])
def test_unsafe_content_is_refused(tmp_path, head, claimed, words):
    path = tmp_path / 'image'
    path.write_bytes(head)
    with pytest.raises(exception.UnsafeImage, match=words) as info:
        image_check.check_file(str(path), claimed)
    assert info.value.client_error
    assert 'image' in str(info.value)
    with pytest.raises(exception.UnsafeImage, match=words):
        image_check.check_head(head, claimed, 'img-1')


@pytest.mark.parametrize('head, claimed, detected', [
    (qcow2(), 'qcow2', 'qcow2'),
    # Dirty, corrupt and compression type are known bits.
    (qcow2(features=0b1011), 'qcow2', 'qcow2'),
    (qcow2(version=2), 'qcow2', 'qcow2'),
    (bytes(4096), 'raw', 'raw'),
    (os.urandom(4096), 'raw', 'raw'),
    # Whole-disk images are raw to QEMU, as Nova allows.
    (protective_mbr(), 'raw', 'gpt'),
])
def test_safe_content_passes(tmp_path, head, claimed, detected):
    path = tmp_path / 'image'
    path.write_bytes(head + bytes(1 << 20))
    assert image_check.check_file(str(path), claimed) == detected
    assert image_check.check_head(head, claimed, 'img-1') == detected


def test_an_empty_file_is_raw(tmp_path):
    path = tmp_path / 'empty'
    path.write_bytes(b'')
    assert image_check.check_file(str(path), 'raw') == 'raw'


def test_head_is_judged_on_its_first_page_only():
    # A qcow2 header past the first page is image data.
    assert image_check.check_head(bytes(4096) + qcow2(), 'raw', 'x') == 'raw'


def test_file_is_opened_without_following_a_symlink(tmp_path):
    target = tmp_path / 'target'
    target.write_bytes(bytes(4096))
    link = tmp_path / 'link'
    link.symlink_to(target)
    with pytest.raises(exception.UnsafeImage, match='cannot open'):
        image_check.check_file(str(link), 'raw')
    with pytest.raises(exception.UnsafeImage, match='cannot open'):
        image_check.check_file(str(tmp_path / 'missing'), 'raw')


def test_only_regular_files(tmp_path):
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    # Opened without blocking: nobody writes to it.
    with pytest.raises(exception.UnsafeImage, match='not a regular file'):
        image_check.check_file(str(fifo), 'raw')
    with pytest.raises(exception.UnsafeImage, match='not a regular file'):
        image_check.check_file(str(tmp_path), 'raw')


@pytest.mark.parametrize('info, words', [
    ({'format': 'raw'}, 'sees raw, not qcow2'),
    ({'format': 'vmdk'}, 'sees vmdk, not qcow2'),
    ({'format': 'qcow2', 'backing-filename': '/etc/shadow'},
     'backing file'),
    ({'format': 'qcow2', 'full-backing-filename': '/etc/shadow'},
     'backing file'),
    ({'format': 'qcow2', 'format-specific': {
        'type': 'qcow2', 'data': {'data-file': '/etc/shadow'}}},
     'external data file'),
])
def test_qemu_img_info_must_agree(info, words):
    with pytest.raises(exception.UnsafeImage, match=words):
        image_check.check_qemu_info(info, 'qcow2', 'img-1')


def test_qemu_img_info_of_a_plain_image():
    image_check.check_qemu_info(
        {'format': 'qcow2', 'virtual-size': SIZE, 'format-specific': {
            'type': 'qcow2', 'data': {'compat': '1.1'}}}, 'qcow2', 'img-1')


class FakeRun:
    def __init__(self, returncode=0, out=None):
        self.returncode = returncode
        self.out = out if out is not None else json.dumps({'format': 'raw'})
        self.seen = []

    def __call__(self, args, timeout):
        path = args[-1]
        self.seen.append((args, oct(os.stat(path).st_mode & 0o777),
                          oct(os.stat(os.path.dirname(path)).st_mode
                              & 0o777), open(path, 'rb').read(), timeout))
        return subprocess.CompletedProcess(args, self.returncode, self.out,
                                           'error')


def test_probe_with_qemu_runs_on_a_private_copy_of_the_head():
    run = FakeRun()
    image_check.probe_with_qemu(b'x' * 10000, 'img-1', '/usr/bin/qemu-img',
                                7, run=run)
    (args, mode, dir_mode, data, timeout), = run.seen
    assert args[:3] == ['/usr/bin/qemu-img', 'info', '--output=json']
    assert len(args) == 4
    # Readable by the unprivileged probe, the head only.
    assert (mode, dir_mode) == ('0o644', '0o711')
    assert data == b'x' * 4096
    assert timeout == 7
    # Nothing is left behind.
    assert not os.path.exists(os.path.dirname(args[-1]))


@pytest.mark.parametrize('run, words', [
    (FakeRun(out=json.dumps({'format': 'vmdk'})), 'probes it as vmdk'),
    (FakeRun(out=json.dumps({'format': 'parallels'})), 'as parallels'),
    (FakeRun(returncode=1, out=''), 'cannot open its first bytes'),
    (FakeRun(out='not json'), 'cannot open its first bytes'),
])
def test_probe_with_qemu_refuses_what_is_not_raw(run, words):
    with pytest.raises(exception.UnsafeImage, match=words):
        image_check.probe_with_qemu(bytes(4096), 'img-1', run=run)


def test_probe_that_hangs_is_a_refusal():
    def run(args, timeout):
        raise subprocess.TimeoutExpired(args, timeout)
    with pytest.raises(exception.UnsafeImage, match='within 3 s'):
        image_check.probe_with_qemu(bytes(4096), 'img-1', timeout=3,
                                    run=run)


def test_check_file_and_head_give_raw_heads_to_the_probe(tmp_path):
    seen = []
    path = tmp_path / 'image'
    path.write_bytes(b'ab' * 4096)
    image_check.check_file(str(path), 'raw', 'img-1',
                           lambda head, label: seen.append((head, label)))
    image_check.check_head(b'cd' * 4096, 'raw', 'img-2',
                           lambda head, label: seen.append((head, label)))
    path.write_bytes(qcow2())
    image_check.check_file(str(path), 'qcow2', 'img-3',
                           lambda head, label: seen.append((head, label)))
    assert seen == [(b'ab' * 2048, 'img-1'), (b'cd' * 2048, 'img-2')]
