"""An emulated cluster on one machine: hosts as network namespaces.

Used by the functional tests, the demo and the benchmark. Layout::

    <id>-sw       a namespace holding the bridge br0 (the "switch")
    <id>-origin   the origin host      eth0 198.18.0.1/15
    <id>-h1 ...   compute hosts        eth0 198.18.0.2/15, ...

Every host has one veth link to the switch. Both directions of a link can
be shaped, with TBF, on the switch side, so the host's own ``eth0`` stays
free for the node's tc configuration (relay rate limiting, see
:mod:`thunder_agent.ratelimit`):

* host downlink: TBF on the switch port's egress;
* host uplink: the port's ingress is redirected (``mirred``) to an IFB
  device whose egress has a TBF.

Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking) and exist only
inside the cluster's namespaces; concurrent clusters use the same addresses
on separate bridges. Ports of the root namespace's loopback (RabbitMQ, the
coordinator's broker) can be exposed on every host's loopback through a
unix socket relay (socat), so an agent inside a host reaches the broker at
the same ``127.0.0.1`` URL and control traffic never crosses the shaped
links or the byte counters.

Names carry a per-cluster id, ``<prefix><owner pid>-<random>``, so
clusters never collide; :func:`cleanup_stale` removes what a crashed run
left (namespaces, processes inside them, root-side relays, sockets).

This is a test and benchmark harness: it needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN) and does its work directly with pyroute2, not through the
agent's privsep daemon.
"""

import dataclasses
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from thunder_agent import exception

LOG = logging.getLogger(__name__)

DEFAULT_PREFIX = 'thunder-'
STATE_ROOT = '/run/thunder-cluster'
NETWORK = ipaddress.ip_network('198.18.0.0/15')
HOST_IFNAME = 'eth0'
BRIDGE = 'br0'
ETH_P_ALL = 0x0003
INGRESS = 0xffff0000
# Queueing a shaper allows before dropping; like a switch port buffer.
SHAPER_LATENCY = '100ms'
# TBF bucket in seconds of the rate: what an idle link sends at once.
SHAPER_BURST_S = 0.01


class ClusterError(exception.NetworkSetupError):
    pass


@dataclasses.dataclass
class LinkCounters:
    """Bytes and packets a host sent (uplink) and received (downlink)."""
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int

    def __sub__(self, other):
        return LinkCounters(*(a - b for a, b in zip(
            dataclasses.astuple(self), dataclasses.astuple(other))))


class Host:
    """One emulated host: a namespace with ``eth0`` on the bridge."""

    def __init__(self, cluster, name, index, uplink_bps, downlink_bps):
        self.cluster = cluster
        self.name = name
        self.index = index
        self.netns = '%s-%s' % (cluster.id, name)
        self.address = str(NETWORK.network_address + 1 + index)
        self.ifname = HOST_IFNAME
        # Interface names in the switch namespace (15 bytes at most).
        self.port = 'p%d' % index
        self.ifb = 'q%d' % index
        self.uplink_bps = uplink_bps
        self.downlink_bps = downlink_bps

    def __repr__(self):
        return '<Host %s %s>' % (self.name, self.address)

    @property
    def exec_prefix(self):
        """argv prefix running a command inside this host."""
        return ['ip', 'netns', 'exec', self.netns]

    def popen(self, argv, **kwargs):
        """Start a process inside this host; teardown stops it."""
        return self.cluster._popen(self, argv, **kwargs)

    def run(self, argv, **kwargs):
        kwargs.setdefault('check', True)
        return subprocess.run(self.exec_prefix + list(argv), **kwargs)

    def counters(self):
        return self.cluster.counters()[self.name]

    def set_bandwidth(self, uplink_bps=None, downlink_bps=None):
        """Change (or remove, with None) the shaping of this host's link."""
        self.uplink_bps = uplink_bps
        self.downlink_bps = downlink_bps
        with IPRoute(netns=self.cluster.switch_netns) as sw:
            self.cluster._shape(sw, self)

    def cut(self):
        """Unplug the host: its link goes down in both directions."""
        self.cluster._set_port(self, 'down')

    def heal(self):
        self.cluster._set_port(self, 'up')


class Cluster:
    """H compute hosts and one origin host on a shaped bridge.

    :param hosts: number of compute hosts (named h1..hH).
    :param bandwidth_bps: default link rate of compute hosts, both
        directions, in bits per second; None leaves links unshaped.
    :param origin_bandwidth_bps: link rate of the origin (default: the
        same as the hosts).
    :param host_bandwidth: per-host overrides, ``{name: bps}`` or ``{name:
        (uplink_bps, downlink_bps)}``.
    :param expose_ports: root-namespace loopback TCP ports to make reachable
        at the same port on every host's loopback.
    """

    def __init__(self, hosts=3, bandwidth_bps=None, origin_bandwidth_bps=None,
                 host_bandwidth=None, expose_ports=(), prefix=DEFAULT_PREFIX,
                 state_root=STATE_ROOT):
        if not re.match(r'^[a-z][a-z0-9-]{0,15}$', prefix):
            raise ValueError('prefix must be a short lower-case name')
        if not 0 < hosts < NETWORK.num_addresses - 3:
            raise ValueError('hosts out of range')
        self.prefix = prefix
        self.id = '%s%d-%s' % (prefix, os.getpid(), secrets.token_hex(3))
        self.switch_netns = self.id + '-sw'
        self.state_dir = os.path.join(state_root, self.id)
        overrides = dict(host_bandwidth or {})
        origin_rate = (bandwidth_bps if origin_bandwidth_bps is None
                       else origin_bandwidth_bps)
        self.origin = Host(self, 'origin', 0,
                           *_pair(overrides.pop('origin', origin_rate)))
        self.hosts = []
        for i in range(1, hosts + 1):
            name = 'h%d' % i
            self.hosts.append(Host(self, name, i, *_pair(
                overrides.pop(name, bandwidth_bps))))
        if overrides:
            raise ValueError('unknown hosts %s' % sorted(overrides))
        self.expose_ports = list(expose_ports)
        self._procs = []
        self._relays = []
        self._started = False

    @property
    def all_hosts(self):
        return [self.origin] + self.hosts

    def host(self, name):
        for host in self.all_hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    # -- lifecycle --

    def start(self):
        _check_root()
        # Leftovers of runs that crashed (their owner is gone) go first.
        cleanup_stale(self.prefix, state_root=os.path.dirname(
            self.state_dir))
        os.makedirs(self.state_dir, mode=0o700)
        self._save_state()
        self._started = True
        try:
            self._build()
            for port in self.expose_ports:
                self.expose_port(port)
        except Exception:
            self.stop()
            raise
        LOG.info('Cluster %s up: %d hosts', self.id, len(self.hosts))
        return self

    def _build(self):
        _create_netns(self.switch_netns)
        for host in self.all_hosts:
            _create_netns(host.netns)
        with IPRoute(netns=self.switch_netns) as sw:
            _up(sw, 'lo')
            sw.link('add', ifname=BRIDGE, kind='bridge')
            bridge = _up(sw, BRIDGE)
            for host in self.all_hosts:
                sw.link('add', ifname=host.port, kind='veth',
                        peer={'ifname': host.ifname,
                              'net_ns_fd': host.netns})
                port = sw.link_lookup(ifname=host.port)[0]
                sw.link('set', index=port, master=bridge, state='up')
                sw.link('add', ifname=host.ifb, kind='ifb')
                _up(sw, host.ifb)
                self._shape(sw, host)
        for host in self.all_hosts:
            with IPRoute(netns=host.netns) as ipr:
                _up(ipr, 'lo')
                index = _up(ipr, host.ifname)
                ipr.addr('add', index=index, address=host.address,
                         prefixlen=NETWORK.prefixlen)

    def stop(self):
        """Tear everything down; safe to call more than once."""
        if not self._started:
            return
        for proc in self._procs:
            _terminate(proc)
        self._procs = []
        for relay in self._relays:
            _kill_group(relay.pid)
            relay.wait(10)
        self._relays = []
        _destroy(self.id, [h.netns for h in self.all_hosts]
                 + [self.switch_netns], self.state_dir)
        self._started = False
        LOG.info('Cluster %s removed', self.id)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _save_state(self):
        state = {'id': self.id, 'pid': os.getpid(),
                 'start_time': _start_time(os.getpid()),
                 'netns': [h.netns for h in self.all_hosts]
                 + [self.switch_netns],
                 'relay_pids': [p.pid for p in self._relays]}
        tmp = os.path.join(self.state_dir, 'state.json.tmp')
        with open(tmp, 'w') as f:
            json.dump(state, f)
        os.replace(tmp, os.path.join(self.state_dir, 'state.json'))

    # -- processes --

    def _popen(self, host, argv, **kwargs):
        kwargs.setdefault('stdin', subprocess.DEVNULL)
        proc = subprocess.Popen(host.exec_prefix + list(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def expose_port(self, port):
        """Make root-namespace 127.0.0.1:*port* answer on every host's
        127.0.0.1:*port*."""
        sock = os.path.join(self.state_dir, 'port-%d.sock' % port)
        relay = subprocess.Popen(
            ['socat', 'UNIX-LISTEN:%s,fork,mode=600' % sock,
             'TCP:127.0.0.1:%d' % port],
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self._relays.append(relay)
        self._save_state()
        _wait_for(lambda: os.path.exists(sock), 10,
                  'relay socket %s' % sock)
        listeners = [
            self._popen(host, ['socat', 'TCP-LISTEN:%d,bind=127.0.0.1,'
                                        'reuseaddr,fork' % port,
                               'UNIX-CONNECT:%s' % sock],
                        stderr=subprocess.DEVNULL)
            for host in self.all_hosts]
        for host, listener in zip(self.all_hosts, listeners):
            inode = _netns_inode(host.netns)
            _wait_for(lambda: _listening(listener.pid, port, inode), 10,
                      'loopback port %d in the hosts' % port)

    # -- links --

    def _shape(self, sw, host):
        port = sw.link_lookup(ifname=host.port)[0]
        ifb = sw.link_lookup(ifname=host.ifb)[0]
        for index in (port, ifb):
            _delete_qdisc(sw, index, root=True)
        _delete_qdisc(sw, port, root=False)
        if host.downlink_bps:
            _tbf(sw, port, host.downlink_bps)
        if host.uplink_bps:
            sw.tc('add', 'ingress', index=port)
            sw.tc('add-filter', 'u32', index=port, parent=INGRESS,
                  protocol=ETH_P_ALL, prio=1, target=1,
                  keys=['0x0/0x0+0'],
                  action={'kind': 'mirred', 'direction': 'egress',
                          'action': 'redirect', 'ifindex': ifb})
            _tbf(sw, ifb, host.uplink_bps)

    def _set_port(self, host, state):
        with IPRoute(netns=self.switch_netns) as sw:
            sw.link('set', index=sw.link_lookup(ifname=host.port)[0],
                    state=state)

    def counters(self):
        """{host name: LinkCounters} as the host sees its link.

        Downlink bytes are what left the switch port after shaping; uplink
        bytes what left the uplink shaper (so packets it dropped are not
        counted), or what entered the port when the uplink is unshaped.
        """
        with IPRoute(netns=self.switch_netns) as sw:
            stats = {link.get('IFLA_IFNAME'): link.get('IFLA_STATS64')
                     for link in sw.get_links()}
        result = {}
        for host in self.all_hosts:
            port = stats[host.port]
            if host.uplink_bps:
                up = stats[host.ifb]
                tx_bytes, tx_packets = up['tx_bytes'], up['tx_packets']
            else:
                tx_bytes, tx_packets = port['rx_bytes'], port['rx_packets']
            result[host.name] = LinkCounters(
                tx_bytes=tx_bytes, rx_bytes=port['tx_bytes'],
                tx_packets=tx_packets, rx_packets=port['tx_packets'])
        return result

    # -- measurement --

    def transfer(self, sender, receiver, nbytes, port=5201, timeout=120):
        """Send *nbytes* over TCP from *sender* (which listens on *port*)
        to *receiver*; return ``{'bytes', 'seconds', 'bps'}`` measured by
        the receiver from connect to end of stream."""
        server = sender.popen(
            [sys.executable, '-c', _SEND_SCRIPT, sender.address, str(port),
             str(nbytes)], stdout=subprocess.PIPE, text=True)
        try:
            if server.stdout.readline().strip() != 'ready':
                raise ClusterError(reason='transfer sender did not start')
            out = receiver.run(
                [sys.executable, '-c', _RECEIVE_SCRIPT, sender.address,
                 str(port)], capture_output=True, text=True,
                timeout=timeout).stdout
            server.wait(timeout)
        finally:
            _terminate(server)
        result = json.loads(out)
        result['bps'] = 8 * result['bytes'] / result['seconds']
        return result


_SEND_SCRIPT = r'''
import socket, sys
address, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((address, port))
listener.listen(1)
print('ready', flush=True)
conn, _ = listener.accept()
chunk = bytes(range(256)) * 256
sent = 0
while sent < size:
    sent += conn.send(chunk[:min(len(chunk), size - sent)])
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
'''

_RECEIVE_SCRIPT = r'''
import json, socket, sys, time
address, port = sys.argv[1], int(sys.argv[2])
start = time.monotonic()
conn = socket.create_connection((address, port), timeout=60)
total = 0
while True:
    data = conn.recv(1 << 20)
    if not data:
        break
    total += len(data)
elapsed = time.monotonic() - start
conn.close()
print(json.dumps({'bytes': total, 'seconds': elapsed}))
'''


def cleanup_stale(prefix=DEFAULT_PREFIX, include_live=False,
                  state_root=STATE_ROOT):
    """Remove clusters left by runs that died (owner process gone).

    With *include_live*, also clusters whose owner still runs. Returns the
    ids of the clusters removed.
    """
    pattern = re.compile(r'^(%s(\d+)-[0-9a-f]{6})(?:-[a-z0-9]+)?$'
                         % re.escape(prefix))
    clusters = {}
    for name in pyroute2_netns.listnetns():
        match = pattern.match(name)
        if match:
            clusters.setdefault(match.group(1), set()).add(name)
    if os.path.isdir(state_root):
        for name in os.listdir(state_root):
            if pattern.match(name):
                clusters.setdefault(name, set())
    removed = []
    for cluster_id, names in sorted(clusters.items()):
        state_dir = os.path.join(state_root, cluster_id)
        state = _load_state(state_dir)
        pid = int(pattern.match(cluster_id).group(2))
        alive = _start_time(pid) is not None and (
            state is None or state.get('start_time') == _start_time(pid))
        if alive and not include_live:
            continue
        for relay_pid in (state or {}).get('relay_pids', []):
            # Only a process that is still that relay (pids get reused).
            if state_dir.encode() in _cmdline(relay_pid):
                _kill_group(relay_pid)
        names |= set((state or {}).get('netns', []))
        _destroy(cluster_id, sorted(names), state_dir)
        removed.append(cluster_id)
        LOG.warning('Removed stale cluster %s', cluster_id)
    return removed


# -- helpers --

def _pair(rate):
    if isinstance(rate, (tuple, list)):
        up, down = rate
    else:
        up = down = rate
    for value in (up, down):
        if value is not None and (not isinstance(value, (int, float))
                                  or not 8000 <= value <= 32e9):
            raise ValueError('link rates are bits per second between 8 kbit '
                             'and 32 Gbit (or None): %r' % (value,))
    return (int(up) if up else None), (int(down) if down else None)


def _check_root():
    if os.geteuid() != 0:
        raise ClusterError(reason='the emulated cluster needs root')
    for tool in ('ip', 'socat'):
        if shutil.which(tool) is None:
            raise ClusterError(reason='%s is not installed' % tool)


def _create_netns(name):
    pyroute2_netns.create(name)
    # No IPv6 chatter (router solicitations, MLD) on the links: the byte
    # counters then show only the traffic under test.
    subprocess.run(['ip', 'netns', 'exec', name, 'sysctl', '-q', '-w',
                    'net.ipv6.conf.all.disable_ipv6=1',
                    'net.ipv6.conf.default.disable_ipv6=1'],
                   check=True, stdout=subprocess.DEVNULL)


def _up(ipr, ifname):
    index = ipr.link_lookup(ifname=ifname)[0]
    ipr.link('set', index=index, state='up')
    return index


def _tbf(ipr, index, bps):
    rate = int(bps) // 8
    # Burst: 10 ms worth of traffic but at least a few full frames.
    burst = max(int(rate * SHAPER_BURST_S), 16 * 1514)
    ipr.tc('add', 'tbf', index=index, handle=0x10000, rate=rate,
           burst=burst, latency=SHAPER_LATENCY)


def _delete_qdisc(ipr, index, root):
    try:
        if root:
            ipr.tc('del', index=index, handle=0, parent=0xffffffff)
        else:
            ipr.tc('del', 'ingress', index=index)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL):
            raise


def _netns_inode(name):
    try:
        return os.stat(os.path.join('/run/netns', name)).st_ino
    except FileNotFoundError:
        return None


def _pids_in(inodes):
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            if os.stat('/proc/%s/ns/net' % entry).st_ino in inodes:
                pids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def _destroy(cluster_id, names, state_dir):
    inodes = {i for i in (_netns_inode(n) for n in names) if i is not None}
    # Processes first: a namespace with a process in it outlives its name,
    # and its links with it.
    if inodes:
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            pids = _pids_in(inodes)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                pids = [p for p in _pids_in(inodes) if not _is_zombie(p)]
                time.sleep(0.05)
            if not pids:
                break
        if _pids_in(inodes):
            LOG.warning('Processes left in cluster %s: %s', cluster_id,
                        _pids_in(inodes))
    for name in names:
        try:
            pyroute2_netns.remove(name)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise
    shutil.rmtree(state_dir, ignore_errors=True)


def _terminate(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start_time(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def _is_zombie(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def _cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return b''


def _load_state(state_dir):
    try:
        with open(os.path.join(state_dir, 'state.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _listening(pid, port, netns_inode):
    """Whether *pid*, once in the namespace *netns_inode*, sees a TCP
    listener on *port* there."""
    try:
        # Until `ip netns exec` has switched namespaces, /proc/<pid>/net
        # is the root namespace's.
        if os.stat('/proc/%d/ns/net' % pid).st_ino != netns_inode:
            return False
        with open('/proc/%d/net/tcp' % pid) as f:
            lines = f.readlines()[1:]
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in lines:
        fields = line.split()
        if fields[3] == '0A' and int(fields[1].split(':')[1], 16) == port:
            return True
    return False


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ClusterError(reason='timed out waiting for %s' % what)
        time.sleep(0.05)
