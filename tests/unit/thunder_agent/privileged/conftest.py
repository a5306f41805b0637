"""Fixtures of the privileged helpers' tests: entry points run in this
process (privsep client mode off), a configuration the helper admits
scopes against, a fake sysfs tree of the devices that exist, and a
recorder in place of every command."""

import os
import subprocess

from oslo_config import cfg
import pytest

from thunder_agent import conf as agent_conf
from thunder_agent import privileged
from thunder_agent.privileged import scope as sc

IMAGE = '0f2b1a3c-5d4e-4f60-8a7b-9c8d7e6f5a4b'
INSTANCE = '5b1f3c2a-0d4e-4f60-8a7b-9c8d7e6f5a4b'
PREFIX = 'tha'
IQN_PREFIX = 'iqn.2010-10.org.openstack.thunder'


@pytest.fixture
def in_process():
    for context in privileged.CONTEXTS:
        context.set_client_mode(False)
    yield
    for context in privileged.CONTEXTS:
        context.set_client_mode(True)


@pytest.fixture
def state(tmp_path):
    path = tmp_path / 'state'
    (path / 'templates' / IMAGE).mkdir(parents=True)
    (path / 'snapshots' / INSTANCE).mkdir(parents=True)
    return path


@pytest.fixture
def scope(in_process, state):
    """The agent's scope, admitted by the helper's configuration (state
    root, device prefix 'th', the default IQN prefix)."""
    agent_conf.register_opts(cfg.CONF)
    cfg.CONF.set_override('state_path', str(state), group='agent')
    cfg.CONF.set_override('device_prefix', 'th', group='kernel')
    yield {'state_path': str(state), 'device_prefix': PREFIX,
           'iqn_prefix': IQN_PREFIX}
    cfg.CONF.clear_override('state_path', group='agent')
    cfg.CONF.clear_override('device_prefix', group='kernel')


class FakeSysfs:
    """A /sys of loop, device-mapper, SCSI and bcache devices."""

    def __init__(self, root):
        self.root = str(root)
        self.virtual = os.path.join(self.root, 'devices', 'virtual',
                                    'block')
        for path in (('class', 'block'), ('block',)):
            os.makedirs(os.path.join(self.root, *path))
        os.makedirs(self.virtual)
        self._minor = 0

    def _device(self, kname, major):
        # As in /sys: the device's directory, linked from block/ and
        # class/block/.
        path = os.path.join(self.virtual, kname)
        os.makedirs(path)
        self._minor += 1
        with open(os.path.join(path, 'dev'), 'w') as f:
            f.write('%d:%d\n' % (major, self._minor))
        os.symlink(path, os.path.join(self.root, 'block', kname))
        os.symlink(path, os.path.join(self.root, 'class', 'block', kname))
        return path

    def loop(self, n, backing):
        path = self._device('loop%d' % n, 7)
        os.makedirs(os.path.join(path, 'loop'))
        with open(os.path.join(path, 'loop', 'backing_file'), 'w') as f:
            f.write(str(backing) + '\n')
        return '/dev/loop%d' % n

    def dm(self, n, name):
        path = self._device('dm-%d' % n, 254)
        os.makedirs(os.path.join(path, 'dm'))
        with open(os.path.join(path, 'dm', 'name'), 'w') as f:
            f.write(name + '\n')
        return '/dev/dm-%d' % n

    def scsi(self, kname, session=True):
        path = self._device(kname, 8)
        where = ('platform/host2/session1/target2:0:0/2:0:0:%s' if session
                 else 'pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/'
                      '0:0:0:%s') % kname
        target = os.path.join(self.root, 'devices', where)
        os.makedirs(target)
        os.symlink(target, os.path.join(path, 'device'))
        with open(os.path.join(path, 'dev')) as f:
            return '/dev/' + kname, f.read().strip()

    def bcache(self, n, slave):
        path = self._device('bcache%d' % n, 252)
        os.makedirs(os.path.join(path, 'slaves'))
        os.symlink(os.path.join(self.root, 'block', slave),
                   os.path.join(path, 'slaves', slave))
        return '/dev/bcache%d' % n


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    fake = FakeSysfs(tmp_path / 'sys')
    monkeypatch.setattr(sc, 'SYSFS', fake.root)
    return fake


class Recorder:
    """subprocess.run: records every tool's argv (``argv``) and the
    bounding set setpriv confines it to (``bounding``), answers from
    ``answers``."""

    def __init__(self):
        self.argv = []
        self.bounding = []
        self.stdin = []
        self.answers = {}

    def __call__(self, argv, input=None, **kwargs):
        argv = list(argv)
        assert argv[:2] == ['setpriv', '--inh-caps=-all'], argv
        assert argv[2].startswith('--bounding-set=-all') and \
            argv[3] == '--', argv
        self.bounding.append(argv[2][len('--bounding-set='):])
        tool = argv[4:]
        self.argv.append(tool)
        self.stdin.append(input)
        code, out, err = self.answers.get(tool[0], (0, '', ''))
        return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture
def commands(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(subprocess, 'run', recorder)
    return recorder
