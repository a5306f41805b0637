"""Fixtures of the tests that run inside the QEMU guest (tools/guest-run).

Four hosts share the guest's kernel, each with its own network namespace
on one bridge, and its own tgtd (control port in brackets):

    origin  10.99.1.1 to 10.99.1.3 [11]   exports the images (loop devices)
    A       10.99.2.1 [12]                relays
    B       10.99.3.1 [13]                relays
    C       10.99.4.1 [14]                relays

The iSCSI initiator (iscsid and the kernel's sessions) is not
namespace-aware, so every host's initiator side lives in the root
namespace and reaches the others over the bridge. Sessions are keyed by
portal and target: the origin has one address per client host so that
A's, B's and C's sessions to it stay apart, as they would on separate
machines.

Two ways to drive the hosts:

* :class:`Agent` calls one host's kernel driver in this process, as the
  manager would (the checks the agent cannot be asked for over RPC: the
  cache choice, a login with a wrong relay key);
* :func:`rpc_cluster` runs a real ``thunder-coordinator`` and one real
  ``thunder-agent`` per host, on the broker the harness started on the
  host (``THUNDER_GUEST_TRANSPORT_URL``), and the tests talk to them over
  oslo.messaging only. Their logs and config files land in the results
  directory (``agents/``).

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
import sys
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
# Device prefix the in-process agents' ('th' + host) start with.
IN_PROCESS_PREFIX = 'th'


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

    def _tgtadm(self, *args):
        return sh('tgtadm', '-C', str(self.control_port), '--lld', 'iscsi',
                  *args)

    def export_origin(self, iqn, device, user, secret):
        """Export *device* as Cinder's target would: LUN 1, CHAP.

        The harness stands in for Cinder here and uses tgtadm (its
        secret on this command line is the test origin's); the agent's
        own exports never run tgtadm.
        """
        tids = [int(line.split()[1].rstrip(':')) for line in
                self.targets().splitlines() if line.startswith('Target ')]
        tid = str(max(tids, default=0) + 1)
        self._tgtadm('--op', 'new', '--mode', 'target', '--tid', tid,
                     '--targetname', iqn)
        self._tgtadm('--op', 'new', '--mode', 'logicalunit', '--tid', tid,
                     '--lun', '1', '--backing-store', device, '--bsoflags',
                     'direct')
        serial = hashlib.sha1(iqn.encode()).hexdigest()[:16]
        self._tgtadm('--op', 'update', '--mode', 'logicalunit', '--tid',
                     tid, '--lun', '1', '--params',
                     'readonly=1,scsi_id=thunder-%s,scsi_sn=%s'
                     % (serial, serial))
        self._tgtadm('--op', 'new', '--mode', 'account', '--user', user,
                     '--password', secret)
        self._tgtadm('--op', 'bind', '--mode', 'account', '--tid', tid,
                     '--user', user)
        self._tgtadm('--op', 'bind', '--mode', 'target', '--tid', tid,
                     '--initiator-address', 'ALL')

    def unexport_origin(self, iqn, user):
        for line in self.targets().splitlines():
            if line.startswith('Target ') and line.split()[2] == iqn:
                self._tgtadm('--op', 'delete', '--mode', 'target', '--tid',
                             line.split()[1].rstrip(':'))
        self._tgtadm('--op', 'delete', '--mode', 'account', '--user', user)


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
    from oslo_config import cfg
    from oslo_privsep import priv_context
    import os_brick.privileged

    from thunder_agent import conf as agent_conf
    from thunder_agent import privileged

    sh('modprobe', '-a', 'sd_mod', 'iscsi_tcp', 'dm_multipath',
       'dm_snapshot', 'dm_cache', 'dm_cache_smq', 'bcache', 'loop')
    root = tmp_path_factory.mktemp('hosts')
    # The forked helpers admit what their configuration (this process's)
    # allows: every in-process agent's state lies under the hosts' root,
    # its device prefix is 'th' + host name.
    agent_conf.register_opts(cfg.CONF)
    cfg.CONF.set_override('state_path', str(root), group='agent')
    cfg.CONF.set_override('device_prefix', IN_PROCESS_PREFIX,
                          group='kernel')
    # The guest runs everything as root: fork the privileged daemons
    # instead of launching them through sudo.
    for context in privileged.CONTEXTS + (os_brick.privileged.default,):
        if context.channel is None:
            context.start(priv_context.Method.FORK)
    if subprocess.run(['pgrep', '-x', 'iscsid'],
                      capture_output=True).returncode != 0:
        sh('iscsid')
    hosts = {
        'origin': Host('origin', 'thunder-origin', ['10.99.1.1',
                                                    '10.99.1.2',
                                                    '10.99.1.3'],
                       11, str(root / 'origin')),
        'a': Host('a', 'thunder-a', ['10.99.2.1'], 12, str(root / 'a')),
        'b': Host('b', 'thunder-b', ['10.99.3.1'], 13, str(root / 'b')),
        'c': Host('c', 'thunder-c', ['10.99.4.1'], 14, str(root / 'c')),
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

    origin = guest['origin']
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
        origin.export_origin(image.iqn, loop, 'origin-' + image_id[:8],
                             image.secret)
        made.append(image)
        return image

    yield make
    for image in made:
        with contextlib.suppress(Exception):
            origin.unexport_origin(image.iqn, 'origin-' + image.image_id[:8])
        sh('losetup', '--detach', image.loop, check=False)


# -- agents' drivers -------------------------------------------------------

# The deployment's relay key: every host derives the CHAP secrets of the
# relay exports from it.
RELAY_KEY = os.urandom(32)
# Each host reads the origin at an address of its own (see the top).
ORIGIN_ADDRESS = {'a': '10.99.1.1', 'b': '10.99.1.2', 'c': '10.99.1.3'}


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
        settings = {'device_prefix': IN_PROCESS_PREFIX + host.name,
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
    return leftovers_of(agent.conf.kernel.device_prefix,
                        agent.conf.agent.state_path, agent.host)


def leftovers_of(device_prefix, state_path, host):
    """Device-mapper devices named *device_prefix*-..., loop devices over
    files under *state_path* and targets of *host*'s tgtd."""
    prefix = device_prefix + '-'
    dm = [line.split()[0] for line in sh('dmsetup', 'ls').splitlines()
          if line.startswith(prefix)]
    state = os.path.realpath(state_path) + '/'
    loops = [line for line in sh('losetup', '--list', '--noheadings',
                                 '--output', 'NAME,BACK-FILE').splitlines()
             if state in line]
    targets = [line for line in host.targets().splitlines()
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


def cluster_portals(hosts):
    """``host:3260`` of every address of the guest's hosts."""
    return {'%s:3260' % address for host in hosts.values()
            for address in host.addresses}


# -- real agents and a coordinator over RPC ---------------------------------

TRANSPORT_URL_ENV = 'THUNDER_GUEST_TRANSPORT_URL'
RPC_HOSTS = ('a', 'b', 'c')
# Python's start-up under TCG: four processes importing oslo.messaging,
# os-brick and their privsep helpers on two emulated CPUs.
START_TIMEOUT = 300
# Waits for what the agents do in the background: heartbeats every 2 s,
# repairs every 2 s, logins and map swaps at TCG speed.
SETTLE_TIMEOUT = 120


def wait_until(predicate, what, timeout=SETTLE_TIMEOUT, interval=0.5):
    """Poll *predicate* until it returns a true value (returned); fail
    naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError('gave up after %d s waiting for %s'
                                 % (timeout, what))
        time.sleep(interval)


class RpcAgent:
    """One host's real thunder-agent process and what the tests ask it."""

    def __init__(self, host, process):
        self.host = host
        self.process = process
        self.node = process.host
        self.device_prefix = 'r' + host.name

    @property
    def client(self):
        return self.process.client

    def origin(self, image):
        """The image's origin as this host reaches it (a dict, as Nova
        would send it)."""
        return image.export(ORIGIN_ADDRESS[self.host.name]).to_dict()

    def prepare(self, image, instance_id=None):
        """Template and snapshot; returns the snapshot's connection_info."""
        return self.client.prepare(image.image_id, self.origin(image),
                                   image.size, 'raw',
                                   instance_id or str(uuid.uuid4()))

    def prepare_template(self, image):
        return self.client.prepare_template(image.image_id,
                                            self.origin(image), image.size,
                                            'raw')

    def status(self):
        return self.client.get_status()

    def template(self, image_id, status=None):
        """The template's entry in get_status, or None."""
        status = status or self.status()
        return next((t for t in status['templates']
                     if t['image_id'] == image_id), None)

    def settled(self, image_id):
        """The template's status once it is READY with nothing running
        on it and its figures in, else None."""
        template = self.template(image_id)
        if (template and template['state'] == 'ready'
                and not template['busy'] and 'bytes_fetched' in template):
            return template
        return None

    def release(self, image_id, timeout=SETTLE_TIMEOUT):
        """release_template, waiting while the coordinator still names
        children (they learn of the change at their next heartbeat, the
        template at its own)."""
        from thunder_agent import exception

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.client.release_template(image_id)
            except exception.TemplateInUse as e:
                if 'snapshot' in str(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(1)

    def leftovers(self):
        return leftovers_of(self.device_prefix, self.process.state_path,
                            self.host)


class RpcCluster:
    def __init__(self, hosts, coordinator, agents):
        self.hosts = hosts
        self.coordinator = coordinator
        self.agents = agents

    def tree(self, image_id):
        return self.coordinator.client.get_tree(image_id)

    def parents(self, image_id):
        """``{node: [parent, ...]}`` of the image's tree."""
        return {node: entry['parents'] for node, entry in
                self.tree(image_id)['nodes'].items()}

    def release_everything(self, timeout=SETTLE_TIMEOUT):
        """Delete every snapshot and template the agents still hold,
        children before parents (cleanup after a failed test)."""
        for agent in self.agents.values():
            for snap in agent.status()['snapshots']:
                agent.client.delete_snapshot(snap['instance_id'])
        from thunder_agent import exception

        deadline = time.monotonic() + timeout
        while True:
            left = [(agent, t['image_id']) for agent in self.agents.values()
                    for t in agent.status()['templates']]
            if not left:
                return
            for agent, image_id in left:
                try:
                    agent.client.release_template(image_id)
                except (exception.TemplateInUse, exception.TemplateBusy):
                    pass
            if time.monotonic() >= deadline:
                raise AssertionError('templates left: %s' % [
                    (agent.node, image_id) for agent, image_id in left])
            time.sleep(1)


# QEMU user networking: the guest's address; the host is 10.0.2.2.
USER_NET_ADDRESS = '10.0.2.15'
USER_NET_PREFIXLEN = 24


def _reach_broker(url):
    """Make sure the broker in *url* answers; bring the guest's user-net
    interface up first if it has no address.

    virtme-ng's init runs udhcpc on the virtio NIC at boot, but udev may
    rename the NIC meanwhile (seen: eth0 -> enp0s10), which leaves it
    down without an address. QEMU's user network always gives the guest
    10.0.2.15, so it is configured statically then.
    """
    import glob
    import socket as socket_mod
    from urllib import parse

    from pyroute2 import IPRoute

    from thunder_lab.emulation import netutil

    where = parse.urlsplit(url)
    if netutil.wait_for_port(where.hostname, where.port, 5):
        return
    nics = [os.path.basename(path) for path in glob.glob(
        '/sys/bus/virtio/drivers/virtio_net/virtio*/net/*')]
    with IPRoute() as ipr:
        for name in nics:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.link('set', index=index, state='up')
            if not ipr.get_addr(index=index, family=socket_mod.AF_INET):
                ipr.addr('add', index=index, address=USER_NET_ADDRESS,
                         prefixlen=USER_NET_PREFIXLEN)
    if not netutil.wait_for_port(where.hostname, where.port, 30):
        pytest.fail('the broker at %s:%s does not answer (interfaces %s)'
                    % (where.hostname, where.port, nics))


@pytest.fixture(scope='session')
def relay_key_file(tmp_path_factory):
    """The deployment's relay key, shared by every agent (mode 0600)."""
    path = str(tmp_path_factory.mktemp('relay') / 'relay.key')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'wb') as f:
        f.write(os.urandom(32))
    return path


def _agent_options(host, topic, key_file, lock_path, tls_dir):
    return {
        # Signed coordinator calls: the node's certificate names it and
        # its export address.
        'tls': {'enabled': 'true', 'certificates_dir': tls_dir},
        'agent': {'housekeeping_interval': 2},
        'kernel': {'tgt_control_port': host.control_port,
                   'export_address': host.address,
                   'device_prefix': 'r' + host.name,
                   'relay_key_file': key_file,
                   # The guest's /tmp has under 1 GiB free: the default
                   # 1 GiB cache floor plus the 1 GiB reserve of the
                   # disk-space admission cannot fit.
                   'cache_min_size_mb': 256},
        'cache': {'reserve_mb': 64},
        'relay': {'enabled': 'true', 'parent_probe_interval': 1,
                  'parent_failures': 2, 'parent_ready_timeout': 15,
                  'join_timeout': 10},
        'coordinator': {'topic': topic, 'heartbeat_interval': 2,
                        'rpc_timeout': 10},
        # One initiator serves every agent here: os-brick serialises its
        # logins and logouts across all of them, as on one compute host.
        'os_brick': {'lock_path': lock_path},
    }


@pytest.fixture(scope='module')
def rpc_cluster(guest, relay_key_file, tmp_path_factory):
    """A coordinator and one agent per host (A, B, C), real processes.

    fan_out and origin_fan_out are 1: the origin has one child and the
    tree of three agents is a chain. After the module every agent must
    have left nothing behind: no device, loop device, target or session.
    """
    from thunder_lab.emulation import agent as agent_mod
    from thunder_lab.emulation import coordinator as coordinator_mod

    url = os.environ.get(TRANSPORT_URL_ENV)
    if not url:
        pytest.fail('%s is not set: tools/guest-run starts a broker unless '
                    'given --no-broker' % TRANSPORT_URL_ENV)
    _reach_broker(url)
    root = tmp_path_factory.mktemp('rpc')
    logs = os.path.join(RESULTS_DIR or str(root), 'agents')
    topic = 'thunder-coordinator-%s' % uuid.uuid4().hex[:8]
    lock_path = str(root / 'os-brick-locks')
    os.makedirs(lock_path, mode=0o700)
    helper = os.path.join(os.path.dirname(sys.executable), 'privsep-helper')
    from thunder_lab import pki
    ca = pki.CA.create(str(root / 'pki' / 'ca'))
    coordinator = coordinator_mod.CoordinatorProcess(
        url, str(root / 'coordinator'), topic=topic,
        options={'coordinator': {'fan_out': 1, 'origin_fan_out': 1,
                                 'heartbeat_interval': 2},
                 'tls': {'enabled': 'true', 'certificates_dir': ca.issue(
                     'coordinator', str(root / 'pki' / 'coordinator'))}},
        log_dir=os.path.join(logs, 'coordinator'))
    agents = {}
    for name in RPC_HOSTS:
        host = guest[name]
        agents[name] = RpcAgent(host, agent_mod.AgentProcess(
            url, str(root / name), host='agent-' + name, backend='kernel',
            options=_agent_options(
                host, topic, relay_key_file, lock_path,
                ca.issue('agent-' + name, str(root / 'pki' / name),
                         ips=[host.address])),
            log_dir=os.path.join(logs, name), privsep_helper=helper))
    processes = [coordinator] + [a.process for a in agents.values()]
    try:
        # In parallel: each start is mostly Python importing.
        for process in processes:
            process.spawn()
        for process in processes:
            process.wait_ready(START_TIMEOUT)
        cluster = RpcCluster(guest, coordinator, agents)
        yield cluster
        cluster.release_everything()
    finally:
        for process in processes:
            with contextlib.suppress(Exception):
                if isinstance(process, agent_mod.AgentProcess):
                    process.teardown()
                else:
                    process.stop()
        for host in guest.values():
            host.restart_tgtd()
    left = {agent.node: agent.leftovers() for agent in agents.values()}
    assert not any(v for found in left.values() for v in found.values()), \
        left
    portals = cluster_portals(guest)
    assert [s for s in iscsi_sessions() if s[0] in portals] == []


def pytest_runtest_logreport(report):
    """Write each failure to the results directory as it happens: a guest
    run killed at its timeout prints no summary."""
    if report.failed and RESULTS_DIR:
        with open(os.path.join(RESULTS_DIR, 'failures.log'), 'a') as f:
            f.write('=== %s (%s) at %s\n%s\n' % (
                report.nodeid, report.when, time.strftime('%H:%M:%S'),
                report.longreprtext))
