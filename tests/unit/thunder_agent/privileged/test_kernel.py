"""Argument checks of the kernel driver's privileged entry points.

The checks run before any command; they are exercised in-process (privsep
client mode off) and never reach a command here.
"""

import pytest

from thunder_agent import exception
from thunder_agent import privileged
from thunder_agent.privileged import kernel as priv


@pytest.fixture
def in_process():
    privileged.default.set_client_mode(False)
    yield
    privileged.default.set_client_mode(True)


def test_entry_points_run_in_the_default_context():
    assert privileged.default.pypath == 'thunder_agent.privileged.default'
    for name in ('dmsetup', 'tgtadm', 'losetup', 'make_bcache',
                 'blockdev_size', 'iscsi_discover', 'write_sysfs',
                 'load_kernel_modules'):
        assert privileged.default.is_entrypoint(getattr(priv, name)), name


@pytest.mark.parametrize('call', [
    lambda: priv.dmsetup(['mknodes']),
    lambda: priv.dmsetup([]),
    lambda: priv.dmsetup('remove x'),
    lambda: priv.dmsetup(['remove', 'a\0b']),
    lambda: priv.tgtadm(['--op', 'show']),
    lambda: priv.tgtadm(['--mode', 'portal', '--op', 'show']),
    lambda: priv.tgtadm(['--mode', 'sys', '--mode', 'target']),
    lambda: priv.load_kernel_modules(['nbd']),
    lambda: priv.write_sysfs('/sys/kernel/mm/ksm/run', '1'),
    lambda: priv.write_sysfs('/etc/passwd', 'x'),
    lambda: priv.write_sysfs('/sys/fs/bcache/../../kernel/x', '1'),
    lambda: priv.blockdev_size('/etc/shadow'),
    lambda: priv.losetup(['--find', 7]),
    lambda: priv.iscsi_discover('--help:3260', 2),
    lambda: priv.iscsi_discover('10.0.0.1', 2),
    lambda: priv.iscsi_discover('10.0.0.1:0', 2),
    lambda: priv.iscsi_discover('10.0.0.1:3260 -o delete', 2),
    lambda: priv.iscsi_discover('[::1:3260', 2),
    lambda: priv.iscsi_discover('[not-v6]:3260', 2),
    lambda: priv.iscsi_discover('999.1.1.1:3260', 2),
    lambda: priv.iscsi_discover(['10.0.0.1:3260'], 2),
    lambda: priv.iscsi_discover('10.0.0.1:3260', 0),
    lambda: priv.iscsi_discover('10.0.0.1:3260', 61),
    lambda: priv.iscsi_discover('10.0.0.1:3260', True),
])
def test_refused_before_running_anything(in_process, call):
    with pytest.raises(exception.PrivilegedOperationNotAllowed):
        call()


@pytest.mark.parametrize('portal', ['10.99.2.1:3260', '[2001:db8::7]:3260',
                                    'storage-7.example.org:3261'])
def test_portals_accepted(portal):
    assert priv.check_portal(portal) == portal


def test_missing_binary_reports_instead_of_raising(in_process, monkeypatch):
    monkeypatch.setenv('PATH', '/nonexistent')
    code, out, err = priv.make_bcache(['--help'])
    assert code == 127 and 'not found' in err
    code, out, err = priv.iscsi_discover('192.0.2.1:3260', 2)
    assert code == 127 and 'iscsiadm' in err
