"""Argument checks of the kernel backend's privileged entry points.

The checks run before any command; they are exercised in-process (privsep
client mode off) and never reach a command here.
"""

import pytest

from thunder_agent import exception
from thunder_agent import privileged


@pytest.fixture
def in_process():
    privileged.default.set_client_mode(False)
    yield
    privileged.default.set_client_mode(True)


@pytest.mark.parametrize('call', [
    lambda: privileged.dmsetup(['mknodes']),
    lambda: privileged.dmsetup([]),
    lambda: privileged.dmsetup('remove x'),
    lambda: privileged.dmsetup(['remove', 'a\0b']),
    lambda: privileged.tgtadm(['--op', 'show']),
    lambda: privileged.tgtadm(['--mode', 'portal', '--op', 'show']),
    lambda: privileged.tgtadm(['--mode', 'sys', '--mode', 'target']),
    lambda: privileged.load_kernel_modules(['nbd']),
    lambda: privileged.write_sysfs('/sys/kernel/mm/ksm/run', '1'),
    lambda: privileged.write_sysfs('/etc/passwd', 'x'),
    lambda: privileged.write_sysfs('/sys/fs/bcache/../../kernel/x', '1'),
    lambda: privileged.blockdev_size('/etc/shadow'),
    lambda: privileged.losetup(['--find', 7]),
])
def test_refused_before_running_anything(in_process, call):
    with pytest.raises(exception.PrivilegedOperationNotAllowed):
        call()


def test_missing_binary_reports_instead_of_raising(in_process, monkeypatch):
    monkeypatch.setenv('PATH', '/nonexistent')
    code, out, err = privileged.make_bcache(['--help'])
    assert code == 127 and 'not found' in err
