"""Fixtures of the tests that run inside the QEMU guest (tools/guest-run).

Three hosts share the guest's kernel, each with its own network namespace
on one bridge, and its own tgtd:

    origin  10.99.1.1 and 10.99.1.2   exports the images (loop devices)
    A       10.99.2.1                 relays from the origin
    B       10.99.3.1                 relays from A, runs the snapshots

The iSCSI initiator (iscsid and the kernel's sessions) is not
namespace-aware, so every host's initiator side lives in the root
namespace and reaches the others over the bridge. Sessions are keyed by
portal and target: the origin has one address per client host so that
A's and B's sessions to it stay apart, as they would on two machines.

Outside the guest every test here is skipped.
"""

import contextlib
import dataclasses
import hashlib
import json
import mmap
import os
import random
import shutil
import subprocess
import time
import uuid

import pytest

IN_GUEST = os.environ.get('THUNDER_GUEST') == '1'
RESULTS_DIR = os.environ.get('THUNDER_GUEST_RESULTS')
MIB = 1024 * 1024
IMAGE_SIZE = 32 * MIB
BRIDGE = 'thbr0'
BRIDGE_ADDRESS = '10.99.0.254'
PREFIXLEN = 16
IQN_PREFIX = 'iqn.2010-10.org.openstack.thunder'


@pytest.fixture(scope='session', autouse=True)
def guest_only():
    if not IN_GUEST:
        pytest.skip('runs only inside the QEMU guest started by '
                    'tools/guest-run (THUNDER_GUEST=1 is not set)')


def sh(*argv, check=True, timeout=120):
    proc = subprocess.run(argv, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError('%s failed (%d): %s' % (
            ' '.join(argv), proc.returncode, proc.stderr.strip()))
    return proc.stdout


def settle():
    """Wait until udev has probed new devices (its reads count too)."""
    sh('udevadm', 'settle', '--timeout=60', check=False)


def record(name, value):
    """Store a measurement in the results directory brought back to the
    host (``measurements.json``) and print it."""
    print('MEASURED %s = %s' % (name, json.dumps(value)))
    if not RESULTS_DIR:
        return
    path = os.path.join(RESULTS_DIR, 'measurements.json')
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[name] = value
    with open(path, 'w') as f:
        json.dump(data, f, indent=1, sort_keys=True)


# -- reading block devices ------------------------------------------------

CHUNK = 256 * 1024


def read_device(path, size, chunk=CHUNK, on_chunk=None):
    """sha256 of the first *size* bytes of *path*, read with O_DIRECT so
    that every byte really goes down the device stack."""
    digest = hashlib.sha256()
    buf = mmap.mmap(-1, chunk)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        offset = 0
        while offset < size:
            n = os.preadv(fd, [buf], offset)
            if n <= 0:
                raise IOError('short read at %d of %s' % (offset, path))
            n = min(n, size - offset)
            digest.update(buf[:n])
            offset += n
            if on_chunk:
                on_chunk(offset)
    finally:
        os.close(fd)
        buf.close()
    return digest.hexdigest()


def write_device(path, offset, data):
    """Write *data* (a multiple of 4 KiB) at *offset* with O_DIRECT."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


# -- the guest's hosts ----------------------------------------------------

@dataclasses.dataclass
class Host:
    name: str
    netns: str
    addresses: list
    control_port: int
    workdir: str
    tgtd: subprocess.Popen = None

    @property
    def address(self):
        return self.addresses[0]

    def start_tgtd(self):
        self.tgtd = subprocess.Popen(
            ['ip', 'netns', 'exec', self.netns, 'tgtd', '-f', '-C',
             str(self.control_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            proc = subprocess.run(['tgtadm', '-C', str(self.control_port),
                                   '--op', 'show', '--mode', 'sys'],
                                  capture_output=True)
            if proc.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError('tgtd of %s did not come up' % self.name)

    def kill_tgtd(self):
        """SIGKILL: the host's exports vanish without a goodbye."""
        if self.tgtd and self.tgtd.poll() is None:
            self.tgtd.kill()
            self.tgtd.wait()
        # Its management socket stays behind; tgtd refuses to start next
        # to a stale one.
        for path in ('/var/run/tgtd/socket.%d' % self.control_port,
                     '/var/run/tgtd/socket.%d.lock' % self.control_port):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def restart_tgtd(self):
        """Start a fresh tgtd unless the running one is alive."""
        if self.tgtd is None or self.tgtd.poll() is not None:
            self.kill_tgtd()
            self.start_tgtd()

    def targets(self):
        return sh('tgtadm', '-C', str(self.control_port), '--lld', 'iscsi',
                  '--op', 'show', '--mode', 'target')


def _setup_network(hosts):
    from pyroute2 import IPRoute
    from pyroute2 import NetNS
    from pyroute2 import netns

    with IPRoute() as ipr:
        ipr.link('add', ifname=BRIDGE, kind='bridge')
        bridge = ipr.link_lookup(ifname=BRIDGE)[0]
        ipr.addr('add', index=bridge, address=BRIDGE_ADDRESS,
                 prefixlen=PREFIXLEN)
        ipr.link('set', index=bridge, state='up')
        for i, host in enumerate(hosts):
            netns.create(host.netns)
            outer, inner = 'thv%d' % i, 'thv%dp' % i
            ipr.link('add', ifname=outer, kind='veth', peer=inner)
            ipr.link('set', index=ipr.link_lookup(ifname=outer)[0],
                     master=bridge, state='up')
            ipr.link('set', index=ipr.link_lookup(ifname=inner)[0],
                     net_ns_fd=host.netns)
            with NetNS(host.netns) as ns:
                ns.link('set', index=ns.link_lookup(ifname='lo')[0],
                        state='up')
                index = ns.link_lookup(ifname=inner)[0]
                for address in host.addresses:
                    ns.addr('add', index=index, address=address,
                            prefixlen=PREFIXLEN)
                ns.link('set', index=index, state='up')


def _teardown_network(hosts):
    from pyroute2 import IPRoute
    from pyroute2 import netns

    with IPRoute() as ipr:
        for i, host in enumerate(hosts):
            with contextlib.suppress(Exception):
                ipr.link('del', index=ipr.link_lookup(ifname='thv%d'
                                                      % i)[0])
            with contextlib.suppress(Exception):
                netns.remove(host.netns)
        with contextlib.suppress(Exception):
            ipr.link('del', index=ipr.link_lookup(ifname=BRIDGE)[0])


def _wait_reachable(address, port=3260, timeout=30):
    from thunder_lab.emulation import netutil

    if not netutil.wait_for_port(address, port, timeout):
        raise RuntimeError('%s:%d is not reachable' % (address, port))


@pytest.fixture(scope='session')
def guest(tmp_path_factory):
    """Kernel modules, privsep daemons, iscsid, namespaces and tgtds."""
    from oslo_privsep import priv_context
    import os_brick.privileged

    from thunder_agent import privileged

    sh('modprobe', '-a', 'sd_mod', 'iscsi_tcp', 'dm_multipath',
       'dm_snapshot', 'dm_cache', 'dm_cache_smq', 'bcache', 'loop')
    # The guest runs everything as root: fork the privileged daemons
    # instead of launching them through sudo.
    for context in (privileged.default, os_brick.privileged.default):
        if context.channel is None:
            context.start(priv_context.Method.FORK)
    if subprocess.run(['pgrep', '-x', 'iscsid'],
                      capture_output=True).returncode != 0:
        sh('iscsid')
    root = tmp_path_factory.mktemp('hosts')
    hosts = {
        'origin': Host('origin', 'thunder-origin', ['10.99.1.1',
                                                    '10.99.1.2'],
                       11, str(root / 'origin')),
        'a': Host('a', 'thunder-a', ['10.99.2.1'], 12, str(root / 'a')),
        'b': Host('b', 'thunder-b', ['10.99.3.1'], 13, str(root / 'b')),
    }
    _setup_network(list(hosts.values()))
    try:
        for host in hosts.values():
            os.makedirs(host.workdir)
            host.start_tgtd()
            for address in host.addresses:
                _wait_reachable(address)
        yield hosts
    finally:
        for host in hosts.values():
            host.kill_tgtd()
        _teardown_network(list(hosts.values()))


# -- images at the origin -------------------------------------------------

@dataclasses.dataclass
class Image:
    image_id: str
    path: str
    size: int
    sha256: str
    loop: str
    iqn: str
    secret: str

    def origin_bytes_read(self):
        """Bytes read from the image's backing device at the origin."""
        with open('/sys/block/%s/stat' % os.path.basename(self.loop)) as f:
            return int(f.read().split()[2]) * 512

    def export(self, portal_address):
        """The origin export as Cinder would hand it out (an
        :class:`~thunder_agent.records.Endpoint`), with its CHAP secret."""
        from thunder_agent import records

        return records.Endpoint('iscsi', {
            'target_portal': '%s:3260' % portal_address,
            'target_iqn': self.iqn, 'target_lun': 1,
            'target_discovered': False, 'auth_method': 'CHAP',
            'auth_username': 'origin-' + self.image_id[:8],
            'auth_password': self.secret})

    def origin(self, portal_address):
        """The origin as a template's source."""
        from thunder_agent import records

        return records.Source.origin(self.export(portal_address))


@pytest.fixture(scope='session')
def make_image(guest):
    """Factory: a random image exported by the origin's tgtd."""
    from thunder_agent.drivers.kernel import chap
    from thunder_agent.drivers.kernel import target

    origin = guest['origin']
    tgt = target.Tgt(origin.control_port)
    made = []

    def make(size=IMAGE_SIZE):
        image_id = str(uuid.uuid4())
        path = os.path.join(origin.workdir, image_id + '.raw')
        digest = hashlib.sha256()
        # Pseudo-random is enough (every block differs) and much cheaper
        # than os.urandom under TCG.
        rng = random.Random(image_id)
        with open(path, 'wb') as f:
            for _ in range(size // MIB):
                block = rng.randbytes(MIB)
                digest.update(block)
                f.write(block)
        loop = sh('losetup', '--find', '--show', '--read-only',
                  path).strip()
        image = Image(image_id, path, size, digest.hexdigest(), loop,
                      '%s:origin:%s' % (IQN_PREFIX, image_id),
                      chap.new_secret())
        tgt.export(image.iqn, loop, 'origin-' + image_id[:8], image.secret)
        made.append(image)
        return image

    yield make
    for image in made:
        with contextlib.suppress(Exception):
            tgt.unexport(image.iqn, 'origin-' + image.image_id[:8])
        sh('losetup', '--detach', image.loop, check=False)


# -- agents' drivers -------------------------------------------------------

# The deployment's relay key: every host derives the CHAP secrets of the
# relay exports from it.
RELAY_KEY = os.urandom(32)
# Each host reads the origin at an address of its own (see the top).
ORIGIN_ADDRESS = {'a': '10.99.1.1', 'b': '10.99.1.2'}


class Agent:
    """One host's kernel driver, driven as the manager would: records in,
    returned values stored in the records, directories of its own."""

    def __init__(self, host, relay_key=RELAY_KEY, **kernel_overrides):
        from oslo_config import cfg

        from thunder_agent.drivers.kernel import driver as kernel
        from thunder_agent import conf as agent_conf

        self.host = host
        self.node = 'host-' + host.name
        # Two agents in one process must not share option overrides.
        conf = agent_conf.register_opts(cfg.ConfigOpts())
        conf([], project='thunder-agent')
        conf.set_override('host', self.node)
        conf.set_override('state_path', os.path.join(host.workdir, 'state'),
                          group='agent')
        conf.set_override('run_path', os.path.join(host.workdir, 'run'),
                          group='agent')
        conf.set_override('enabled', True, group='relay')
        key_file = os.path.join(host.workdir, 'relay-%s.key'
                                % hashlib.sha256(relay_key).hexdigest()[:8])
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'wb') as f:
            f.write(relay_key)
        settings = {'device_prefix': 'th' + host.name,
                    'tgt_control_port': host.control_port,
                    'export_address': host.address,
                    'relay_key_file': key_file}
        settings.update(kernel_overrides)
        for key, value in settings.items():
            conf.set_override(key, value, group='kernel')
        os.makedirs(conf.agent.run_path, exist_ok=True)
        self.conf = conf
        self.driver = kernel.KernelDriver(conf)
        self.driver.start()

    def template_dir(self, image_id):
        return os.path.join(self.conf.agent.state_path, 'templates',
                            image_id)

    def snapshot_dir(self, instance_id):
        return os.path.join(self.conf.agent.state_path, 'snapshots',
                            instance_id)

    def origin(self, image):
        """The image's origin as this host reaches it."""
        return image.origin(ORIGIN_ADDRESS[self.host.name])

    def parent_source(self, parent, template):
        """The source reading *parent*'s relaying *template*, as this
        host's manager builds it from the coordinator's answer."""
        return self.driver.parent_source(parent.node, template.export.relay,
                                         template.image_id)

    def create_template(self, image, sources=None, relay=False):
        """A READY template; *relay*: exported to children, under the
        address the manager would reserve."""
        from thunder_agent import records

        origin = self.origin(image)
        template = records.Template(
            image_id=image.image_id, origin=origin.endpoint,
            size=image.size, image_format='raw', driver='kernel',
            sources=list(sources or [origin]))
        if relay:
            template.export = records.Export(
                'kernel', {}, relay=self.driver.relay_address(
                    image.image_id, []))
        tdir = self.template_dir(image.image_id)
        os.makedirs(tdir)
        try:
            build = self.driver.create_template(template, tdir)
        except Exception:
            with contextlib.suppress(Exception):
                self.driver.delete_template(template, tdir)
            shutil.rmtree(tdir)
            raise
        template.export = build.export
        if build.driver_state is not None:
            template.driver_state = build.driver_state
        template.state = records.READY
        return template

    def set_sources(self, template, sources):
        state = self.driver.set_sources(
            template, self.template_dir(template.image_id), sources)
        template.sources = list(sources)
        if state is not None:
            template.driver_state = state

    def stats(self, template):
        stats, state = self.driver.template_stats(
            template, self.template_dir(template.image_id))
        if state is not None:
            template.driver_state = state
        return stats

    def delete_template(self, template):
        tdir = self.template_dir(template.image_id)
        self.driver.delete_template(template, tdir)
        shutil.rmtree(tdir)

    def create_snapshot(self, template):
        from thunder_agent import records

        snap = records.Snapshot(instance_id=str(uuid.uuid4()),
                                image_id=template.image_id)
        sdir = self.snapshot_dir(snap.instance_id)
        os.makedirs(sdir)
        snap.connection_info = self.driver.create_snapshot(
            template, self.template_dir(template.image_id),
            snap.instance_id, sdir)
        snap.state = records.READY
        return snap

    def delete_snapshot(self, template, snap):
        sdir = self.snapshot_dir(snap.instance_id)
        self.driver.delete_snapshot(
            template, self.template_dir(template.image_id), snap, sdir)
        shutil.rmtree(sdir)


@pytest.fixture
def agents(guest):
    """Factory of agents; checks after the test that each one left no
    device behind."""
    made = []

    def make(name, **overrides):
        agent = Agent(guest[name], **overrides)
        made.append(agent)
        return agent

    yield make
    # A test that killed a host's tgtd must not break the next one.
    for host in guest.values():
        host.restart_tgtd()
    for agent in made:
        left = leftovers(agent)
        assert not any(left.values()), left


def leftovers(agent):
    """What an agent left in the kernel and in tgt."""
    prefix = agent.conf.kernel.device_prefix + '-'
    dm = [line.split()[0] for line in sh('dmsetup', 'ls').splitlines()
          if line.startswith(prefix)]
    state = os.path.realpath(agent.conf.agent.state_path) + '/'
    loops = [line for line in sh('losetup', '--list', '--noheadings',
                                 '--output', 'NAME,BACK-FILE').splitlines()
             if state in line]
    targets = [line for line in agent.host.targets().splitlines()
               if line.startswith('Target ')]
    return {'dm': dm, 'loops': loops, 'targets': targets}


def iscsi_sessions():
    """``[(portal, iqn)]`` of the kernel's iSCSI sessions."""
    proc = subprocess.run(['iscsiadm', '-m', 'session'],
                          capture_output=True, text=True)
    sessions = []
    for line in proc.stdout.splitlines():
        # tcp: [3] 10.99.1.1:3260,1 iqn.... (non-flash)
        fields = line.split()
        if len(fields) >= 4:
            sessions.append((fields[2].split(',')[0], fields[3]))
    return sessions
