"""The ``qemu`` driver: templates as qemu-storage-daemon block graphs.

Per template, one qemu-storage-daemon (one failure domain, one process to
restart, its own NBD server) holds::

    export "<image_id>"  (NBD, read-only, unix socket <run_path>/<id>.nbd)
      |
    copy-on-read filter "template"
      qcow2 "cache"  (file <state>/templates/<id>/cache.qcow2)
        backing: format node "origin" over protocol node "source"
                 (nbd to the origin server or a parent, a file, or iscsi)

A read that misses the cache is fetched from the source and written into
the cache (copy-on-read), so every block crosses the source link once.
A relaying template's "source" node reads the local forwarder of
:mod:`~thunder_agent.drivers.qemu.upstream`, which points at the current
parent: re-parenting swaps the forwarder, QEMU's NBD client reconnects and
the graph never changes.

A relaying template's children reach it on its relay address through the
relay listener of :mod:`~thunder_agent.drivers.qemu.upstream` (socat on
TCP, forwarding to the unix socket): QEMU 7.2 has one NBD server per
process with one listening address, and its ``max-connections`` counts all
of that server's clients, so the daemon listens on its unix socket only and
TCP strangers can take the listener's ``[qemu] relay_connections`` slots,
never those of local VMs (``local_connections``) or of the agent's own
flushes and prefetches. (Templates built before this layout listen on TCP
themselves and keep doing so while their record says so: running VMs use
that address.)

With ``[tls] enabled`` (:mod:`thunder_agent.tls`) every TCP NBD link is
TLS, certificates checked both ways: the relay listener forwards children
to the template's relay export (:mod:`~thunder_agent.drivers.qemu.
relay_export`), which admits the CN=<node id> of the template's current
children only (:meth:`QemuDriver.set_children`); a source read over TCP
(the origin, or a parent of a template that does not relay) gets QEMU's
x509 client credentials, and QEMU checks the server's certificate against
the address connected to; the probes' libnbd handles require TLS the same
way. Unix sockets (local readers, a local origin) stay plain.

A snapshot is a qcow2 overlay file whose backing is the template's NBD
export; the VM's QEMU opens it directly, so VM writes never pass through
the agent or the template daemon, and the NBD client's reconnect delay
carries the VM over a template daemon restart.

Everything that names a source is checked before any use (:meth:`QemuDriver.
_endpoint`): a parent (from the coordinator, over RabbitMQ) must be an IP
address literal in ``[relay] peer_networks`` with a port of ``port_min..
port_max`` exporting the image under its id; the origin is the template's
own. Image content is checked by :mod:`thunder_agent.image_check` before a
graph opens it, and every qcow2 node is opened with ``backing: null``.

Every wait is bounded by an option: daemon start and monitor commands by
``[qemu] start_timeout`` (30 s), qemu-img runs by ``command_timeout``
(60 s), a new NBD client's connection to its source by ``open_timeout``
(10 s; never ``reconnect_delay``, 300 s, which would hold the daemon's
monitor that long on a dead parent), flushes by ``flush_timeout`` (10 s)
and source probes by ``[relay] parent_probe_timeout`` (2 s).
"""

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import time

import nbd
from oslo_log import log as logging
from oslo_utils import excutils

from thunder_agent import exception
from thunder_agent.drivers import base
from thunder_agent.drivers.qemu import recovery
from thunder_agent.drivers.qemu import relay_export
from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent.drivers.qemu import upstream
from thunder_agent import image_check
from thunder_agent import manifest as manifest_mod
from thunder_agent import prefetch
from thunder_agent import records
from thunder_agent import tls
from thunder_agent import validation

LOG = logging.getLogger(__name__)

CACHE_FILE = 'cache.qcow2'
# The image's digest manifest, fetched from the origin.
MANIFEST_FILE = 'manifest'
# Bytes of the manifest fetched per NBD read.
MANIFEST_CHUNK = 4 << 20
OVERLAY_FILE = 'overlay.qcow2'
EXPORT_ID = 'template'
ORIGIN_KINDS = ('file', 'nbd', 'iscsi')
# Longest stderr of a failed qemu-img kept in an error.
_STDERR_TAIL = 500


# Clusters a cache file may hold beyond its fully allocated layout: a
# refcount table QEMU moved while the file grew (the old one is freed and
# reused, not given back) and a cluster leaked by a crash. None of these
# showed in the measured fills (tests/functional/thunder_agent/
# test_agent_disk_full.py); 4 of 64 KiB are 256 KiB per template.
CAPACITY_SPARE_CLUSTERS = 4


def qcow2_full_size(size, cluster_size, refcount_bits=16):
    """Bytes of a qcow2 file of *size* virtual bytes whose every cluster
    is allocated: what ``qemu-img measure -O qcow2`` calls
    ``fully-allocated`` (QEMU's qcow2_calc_prealloc_size; equal for every
    size and cluster size tried, from 1 MiB to 2 TiB, 512 B to 2 MiB).

    The header cluster, the data rounded up to clusters, an 8-byte L2
    entry per cluster and an 8-byte L1 entry per L2 table (each table
    rounded up to whole clusters), and 16-bit refcounts for all of it,
    refcount blocks and table included: for 64 KiB clusters the image plus
    about 0.02 % plus a few clusters (20 MiB: 20.3 MiB).
    """
    def up(value, unit):
        return -(-value // unit) * unit

    aligned = up(size, cluster_size)
    meta = cluster_size                                 # header
    l2_entries = up(aligned // cluster_size, cluster_size // 8)
    meta += l2_entries * 8
    l1_entries = up(l2_entries * 8 // cluster_size, cluster_size // 8)
    meta += l1_entries * 8
    clusters = (meta + aligned) // cluster_size
    per_block = cluster_size * 8 // refcount_bits
    per_table = cluster_size // 8
    blocks = table = total = 0
    while True:
        # Refcount blocks count themselves and the table: to a fixed point.
        last = total
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table)
        total = clusters + blocks + table
        if total == last:
            break
    return meta + (blocks + table) * cluster_size + aligned


def run_command(args, timeout, pass_fds=()):
    """Run *args*; a CompletedProcess, or BackendError after *timeout*."""
    try:
        return subprocess.run(args, capture_output=True, text=True,
                              timeout=timeout, pass_fds=pass_fds,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        # Only the tool and its verb: the rest may name a source.
        raise exception.BackendError(
            reason='%s timed out after %s s' % (' '.join(args[:2]), timeout))
    except FileNotFoundError:
        raise exception.BackendError(
            reason='%s is not installed (Debian package qemu-utils)'
                   % args[0])


def interface_networks(address):
    """The networks the host's interfaces have IP address *address* on
    (``127.0.0.0/8`` for ``127.0.0.1`` on ``lo``), from the kernel's
    address table of this network namespace."""
    from pyroute2 import IPRoute
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    found = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=family):
            for key in ('IFA_LOCAL', 'IFA_ADDRESS'):
                value = msg.get_attr(key)
                if value and ipaddress.ip_address(value) == ip:
                    found.add(ipaddress.ip_network(
                        '%s/%d' % (ip, msg['prefixlen']), strict=False))
                    break
    return sorted(found, key=str)


class _Timeout(Exception):
    """An NBD step did not finish by its deadline."""


class _Refused(Exception):
    """The NBD server ended the handshake without the export."""


class QemuDriver(base.Driver):
    """Templates as qemu-storage-daemon graphs, snapshots as qcow2 overlays.

    The keyword arguments replace the process boundary in unit tests:
    *daemon_factory*, *upstream_factory* and *listener_factory* build
    :class:`~storage_daemon.StorageDaemon`, :class:`~upstream.Upstream` and
    :class:`~upstream.RelayListener` lookalikes, *runner* runs qemu-img
    like :func:`run_command`, *nbd_factory* makes libnbd handles, *clock*
    measures deadlines, *networks* answers :func:`interface_networks` and
    *probe_runner* runs the unprivileged format probe like
    :func:`thunder_agent.image_check.run_unprivileged`.
    """

    name = 'qemu'
    # A parent's NBD handshake costs a round trip, no qemu-img start.
    ready_poll_interval = 0.05

    def __init__(self, conf, daemon_factory=None, upstream_factory=None,
                 runner=None, nbd_factory=None, clock=time.monotonic,
                 listener_factory=None, networks=interface_networks,
                 probe_runner=None, exporter_factory=None):
        super().__init__(conf)
        self.run_path = conf.agent.run_path
        self.qemu_img = conf.qemu.qemu_img
        self.reconnect_delay = conf.qemu.reconnect_delay
        self.cluster_size = conf.cache.cluster_size
        self._daemon_factory = daemon_factory or storage_daemon.StorageDaemon
        self._upstream_factory = upstream_factory or upstream.Upstream
        self._listener_factory = listener_factory or upstream.RelayListener
        self._exporter_factory = (exporter_factory
                                  or relay_export.RelayExport)
        self._credentials = None
        self._runner = runner or run_command
        self._nbd = nbd_factory or nbd.NBD
        self._clock = clock
        self._networks = networks
        self._probe_runner = probe_runner
        self._peer_networks = None
        # Templates already logged as taking no parent (no manifest).
        self._unverified = set()
        self._recovery = recovery.CacheRecovery(
            lambda args: self._runner([self.qemu_img] + args,
                                      self.conf.qemu.command_timeout),
            clock)

    def start(self):
        os.makedirs(self.run_path, mode=0o750, exist_ok=True)

    # -- helpers ---------------------------------------------------------
    def _daemon(self, image_id):
        return self._daemon_factory(
            image_id, self.run_path, self.conf.qemu.storage_daemon,
            self.conf.qemu.start_timeout)

    def _upstream(self, image_id):
        return self._upstream_factory(image_id, self.run_path)

    def _relay_listener(self, image_id):
        return self._listener_factory(image_id, self.run_path)

    def _socket(self, image_id):
        return os.path.join(self.run_path, image_id + '.nbd')

    def _relay_export(self, image_id):
        return self._exporter_factory(
            image_id, self.run_path, self.conf.tls.certificates_dir,
            self.conf.qemu.storage_daemon, self.conf.qemu.start_timeout)

    def _tls(self):
        """This node's [tls] credentials, checked at first use (a node
        without TCP NBD links needs none); None with TLS off."""
        if not self.conf.tls.enabled:
            return None
        if self._credentials is None:
            self._credentials = tls.Credentials.from_conf(self.conf)
        return self._credentials

    @staticmethod
    def _relay_of(template):
        return template.export.relay if template.export else None

    @staticmethod
    def _tcp_daemon(template):
        """True for a relaying template of the layout before the relay
        listener, whose daemon listens on TCP itself: its record's local
        export is host and port, which running VMs use."""
        return bool(template.export and template.export.relay
                    and 'host' in (template.export.local or {}))

    def _listens(self, template):
        """True when the template's children reach it through a relay
        listener."""
        return (self._relay_of(template) is not None
                and not self._tcp_daemon(template))

    def _relay_cap(self):
        return (self.conf.qemu.relay_connections
                or 2 * self.conf.coordinator.fan_out + 4)

    def _server_cap(self, template):
        """QEMU max-connections of the template daemon's NBD server."""
        cap = self.conf.qemu.local_connections
        if self._relay_of(template) is not None:
            cap += self._relay_cap()
        return cap

    def _local(self, template):
        if self._tcp_daemon(template):
            relay = template.export.relay
            return {'host': relay.host, 'port': relay.port,
                    'export': template.image_id}
        return {'socket': self._socket(template.image_id),
                'export': template.image_id}

    def _export(self, template):
        return records.Export(self.name, self._local(template),
                              self._relay_of(template))

    def _reader_local(self, template):
        """Where readers of the template connect: the recorded export
        (what running VMs use), else the one a build makes."""
        if template.export is not None and template.export.local:
            return dict(template.export.local)
        return self._local(template)

    def _listener(self, template):
        if self._tcp_daemon(template):
            relay = template.export.relay
            return {'type': 'inet', 'host': relay.host,
                    'port': str(relay.port)}
        return {'type': 'unix', 'path': self._socket(template.image_id)}

    def _listener_args(self, template):
        """RelayListener.start/points_at arguments of the template."""
        relay = template.export.relay
        family = ipaddress.ip_address(relay.host).version
        networks = [n for n in self._peers() if n.version == family]
        if len(networks) != 1:
            # socat takes one range; several would need a firewall.
            LOG.warning('Template %s: the relay listener accepts children '
                        'from anywhere: %d networks of [relay] '
                        'peer_networks are IPv%d', template.image_id,
                        len(networks), family)
        # With TLS, children reach the relay export, never the template
        # daemon's plain socket.
        target = (self._relay_export(template.image_id).socket
                  if self.conf.tls.enabled
                  else self._socket(template.image_id))
        return (relay.host, relay.port, target, self._relay_cap(),
                networks[0] if len(networks) == 1 else None)

    def _ensure_relay_export(self, template, children=None):
        """Start the relay export when it is not running (admitting
        *children*, nobody when None: the manager gives the list after
        each build), else give it *children* when not None."""
        self._tls()
        export = self._relay_export(template.image_id)
        if export.is_running():
            if children is not None:
                export.set_children(children)
            return
        export.start(children or (), self._relay_cap(),
                     self.reconnect_delay, self.conf.qemu.open_timeout)

    def _ensure_relay_listener(self, template):
        if self.conf.tls.enabled:
            self._ensure_relay_export(template)
        listener = self._relay_listener(template.image_id)
        args = self._listener_args(template)
        if not listener.points_at(*args):
            listener.start(*args)

    def _forwards(self, template):
        """True when the template reads through a forwarder: it relays and
        its source is an NBD server."""
        return (self._relay_of(template) is not None
                and template.source.endpoint.driver_volume_type == 'nbd')

    def _verify(self, template, template_dir):
        """How the template's verifier checks its reads: the manifest in
        *template_dir* (None when the origin serves none)."""
        path = os.path.join(template_dir, MANIFEST_FILE)
        return upstream.Verify(
            template.origin, path if os.path.exists(path) else None,
            self.conf.tls.certificates_dir if self.conf.tls.enabled
            else None, self.conf.relay.parent_wait)

    def _verified_source(self, template, template_dir, endpoint):
        """*endpoint*, or the origin when a parent's bytes cannot be
        checked (no manifest), with the Verify to read it under."""
        verify = self._verify(template, template_dir)
        if verify.manifest is None and endpoint != template.origin:
            if template.image_id not in self._unverified:
                self._unverified.add(template.image_id)
                LOG.warning('Template %s takes no parent: its origin serves '
                            'no manifest to check a parent\'s bytes against',
                            template.image_id)
            endpoint = template.origin
        return endpoint, verify

    def _upstream_is(self, template, template_dir, endpoint):
        endpoint, verify = self._verified_source(template, template_dir,
                                                 endpoint)
        return self._upstream(template.image_id).verifies(endpoint, verify)

    def _point_upstream(self, template, template_dir, endpoint):
        """Make the verifier read *endpoint* (kept when it does)."""
        endpoint, verify = self._verified_source(template, template_dir,
                                                 endpoint)
        up = self._upstream(template.image_id)
        if not up.verifies(endpoint, verify):
            up.start_verifier(endpoint, verify)
        return up

    def _ensure_forwarder(self, template, template_dir):
        return self._point_upstream(
            template, template_dir,
            self._endpoint(template.source, template.image_id,
                           template.origin))

    def _fetch_manifest(self, template, template_dir):
        """Fetch the image's manifest from the origin (export
        ``<origin export>.manifest``, TLS on TCP) into *template_dir*,
        within ``[qemu] command_timeout``. An origin that serves none (or a
        bad one) is logged: the template then takes no parent."""
        origin = template.origin
        data = dict(origin.data, export=manifest_mod.export_name(
            origin.data.get('export', '')))
        deadline = self._clock() + self.conf.qemu.command_timeout
        # The most a manifest of this image can take, at the smallest block.
        limit = manifest_mod.HEADER_SIZE + manifest_mod.PAD + (
            manifest_mod.DIGEST_SIZE * manifest_mod.block_count(
                template.size, manifest_mod.MIN_BLOCK_SIZE))
        handle = None
        try:
            handle = self._nbd_connect(data, deadline)
            size = handle.get_size()
            if size > limit:
                raise exception.InvalidManifest(
                    reason='%d bytes for an image of %d' % (size,
                                                            template.size))
            raw = bytearray(size)
            for offset in range(0, size, MANIFEST_CHUNK):
                view = memoryview(raw)[offset:offset + MANIFEST_CHUNK]
                cookie = handle.aio_pread(nbd.Buffer.from_buffer(view),
                                          offset)
                self._nbd_wait(handle,
                               lambda: handle.aio_command_completed(cookie),
                               deadline)
            manifest_mod.Manifest.from_bytes(raw, template.size).write(
                os.path.join(template_dir, MANIFEST_FILE))
            return True
        except exception.InvalidManifest as e:
            reason = str(e)
        except nbd.Error as e:
            reason = 'fetching it failed: %s' % e
        except _Refused:
            reason = 'the origin serves no manifest export'
        except _Timeout:
            reason = ('fetching it took more than %s s'
                      % self.conf.qemu.command_timeout)
        finally:
            handle = None
        LOG.warning('Template %s has no manifest (%s): it takes no parent; '
                    'its cache, when not stopped cleanly, is discarded',
                    template.image_id, reason)
        return False

    def source_mismatch(self, template, template_dir):
        """What the verifier rejected from the current parent, or None."""
        if not self._forwards(template):
            return None
        report = self._upstream(template.image_id).mismatch()
        if not report:
            return None
        try:
            return base.SourceMismatch(
                parent=str(report['parent']),
                bad_blocks=tuple(int(b) for b in report['bad_blocks']),
                block_size=int(report['block_size']),
                time=float(report['time']))
        except (KeyError, TypeError, ValueError):
            LOG.warning('Template %s: unreadable verifier report',
                        template.image_id)
            return None

    def _graph_endpoint(self, template, template_dir):
        """The endpoint the block graph reads: for a relaying template the
        local verifier (which reads the current parent)."""
        endpoint = self._endpoint(template.source, template.image_id,
                                  template.origin)
        if not self._forwards(template):
            return endpoint
        up = self._ensure_forwarder(template, template_dir)
        return records.Endpoint('nbd', {'socket': up.socket,
                                        'export': template.image_id})

    # -- addresses from other hosts ---------------------------------------
    def _peers(self):
        """[relay] peer_networks, or the network(s) [relay] listen_address
        is on (looked up until found, then kept)."""
        if self.conf.relay.peer_networks:
            return [ipaddress.ip_network(n) for n in
                    self.conf.relay.peer_networks]
        if self._peer_networks is None:
            host = self.conf.relay.listen_address
            try:
                found = self._networks(host)
            except (ValueError, OSError) as e:
                LOG.error('Cannot find the network of [relay] '
                          'listen_address %s: %s', host, e)
                found = []
            if not found:
                LOG.error('[relay] listen_address %s is on no interface: '
                          'no parent is accepted until it is (or [relay] '
                          'peer_networks is set)', host)
                return []
            LOG.info('Relay peers are accepted from %s (the network of '
                     '[relay] listen_address)',
                     ', '.join(str(n) for n in found))
            self._peer_networks = found
        return self._peer_networks

    def _parent_data(self, image_id, host, port, export):
        """The NBD address of a parent's export, checked, or
        InvalidAddress. *image_id* None: any image id as export."""
        def refuse(reason):
            LOG.warning('Refused parent address %r: %s', address, reason)
            return exception.InvalidAddress(address=address, reason=reason)

        address = {'host': host, 'port': port, 'export': export}
        try:
            ip = upstream.ip_literal(host)
        except ValueError:
            # A parent's export listens on its [relay] listen_address,
            # which this driver requires to be an IP address: a name
            # would be resolved by whoever connects, every time.
            raise refuse('the host must be an IP address literal without '
                         'scope id')
        if ip.is_unspecified or ip.is_multicast or (
                ip.version == 6 and ip.ipv4_mapped is not None):
            raise refuse('the host is not a unicast address')
        if not any(ip in network for network in self._peers()):
            raise refuse('the host is outside [relay] peer_networks')
        low, high = self.conf.relay.port_min, self.conf.relay.port_max
        if isinstance(port, bool) or not isinstance(port, int) or not (
                low <= port <= high):
            raise refuse('the port is outside the relay ports %d-%d'
                         % (low, high))
        if image_id is not None:
            if export != image_id:
                raise refuse('the export is not the image id %s'
                             % image_id)
        else:
            try:
                validation.image_id(export)
            except exception.InvalidImageId:
                raise refuse('the export is not an image id')
        return {'host': str(ip), 'port': port, 'export': export}

    def _endpoint(self, source, image_id=None, origin=None):
        """The endpoint of *source*, checked before any use.

        An origin source must be the template's *origin* (when known); a
        parent's is an NBD export checked by :meth:`_parent_data`.
        Raises InvalidAddress or InvalidSource.
        """
        endpoint = source.endpoint
        if source.is_origin:
            if origin is not None and endpoint != origin:
                raise exception.InvalidSource(
                    reason='an origin source must be the template\'s '
                           'origin')
            return endpoint
        data = endpoint.data
        if (endpoint.driver_volume_type != 'nbd' or not isinstance(
                data, dict) or set(data) != {'host', 'port', 'export'}):
            raise exception.InvalidSource(
                reason='a parent of the qemu driver is an NBD export '
                       'given by host, port and export')
        return records.Endpoint('nbd', self._parent_data(
            image_id, data['host'], data['port'], data['export']))

    def _protocol(self, endpoint, probe=False):
        """Blockdev options of the protocol node reaching *endpoint*."""
        kind, data = endpoint.driver_volume_type, endpoint.data
        if kind == 'file':
            return {'driver': 'file', 'filename': data['path'],
                    'read-only': True}
        if kind == 'nbd':
            if 'socket' in data:
                server = {'type': 'unix', 'path': data['socket']}
            else:
                server = {'type': 'inet', 'host': data['host'],
                          'port': str(data['port'])}
            opts = {'driver': 'nbd', 'server': server,
                    'export': data.get('export', ''), 'read-only': True}
            if 'host' in data and self._tls() is not None:
                # QEMU checks the server's certificate against the host
                # connected to (an IP address in a parent's SANs).
                opts['tls-creds'] = tls.CLIENT_CREDS_ID
            if not probe:
                # open-timeout bounds blockdev-add (and so the daemon's
                # monitor) on a source that died since it was probed;
                # reconnect-delay is how long reads queue while it
                # reconnects later.
                opts['reconnect-delay'] = self.reconnect_delay
                opts['open-timeout'] = self.conf.qemu.open_timeout
            return opts
        if kind == 'iscsi':
            opts = {'driver': 'iscsi', 'transport': 'tcp',
                    'portal': data['target_portal'],
                    'target': data['target_iqn'],
                    'lun': int(data.get('target_lun', 0)),
                    'read-only': True}
            if data.get('auth_method') == 'CHAP':
                opts['user'] = data['auth_username']
            return opts
        raise exception.BackendError(reason='unsupported source %r' % kind)

    @staticmethod
    def _secret(endpoint):
        data = endpoint.data
        if (endpoint.driver_volume_type == 'iscsi'
                and data.get('auth_method') == 'CHAP'):
            return data['auth_password']
        return None

    def _format_node(self, image_format, node_name, file):
        opts = {'driver': image_format, 'node-name': node_name,
                'file': file, 'read-only': True}
        if image_format == 'qcow2':
            # Image content is the tenant's: never follow a backing file
            # its header names.
            opts['backing'] = None
        return opts

    def _qemu_probe(self, head, label):
        """QEMU's own format probe of a raw image's first bytes."""
        image_check.probe_with_qemu(head, label, self.qemu_img,
                                    self.conf.qemu.command_timeout,
                                    run=self._probe_runner)

    def _qemu_img(self, args, pass_fds=()):
        proc = self._runner([self.qemu_img] + args,
                            self.conf.qemu.command_timeout, pass_fds)
        if proc.returncode != 0:
            raise exception.BackendError(
                reason='qemu-img %s failed: %s'
                       % (args[0], proc.stderr.strip()[-_STDERR_TAIL:]))
        return proc

    # -- transport -------------------------------------------------------
    def check_origin(self, origin):
        kind = origin.driver_volume_type
        if kind not in ORIGIN_KINDS:
            raise exception.InvalidOrigin(
                reason='the qemu driver reads %s origins, not %r'
                       % (', '.join(ORIGIN_KINDS), kind))
        if kind == 'iscsi':
            method = origin.data.get('auth_method')
            if method not in (None, '', 'CHAP'):
                raise exception.InvalidOrigin(
                    reason='QEMU\'s iscsi driver knows CHAP only, not %r'
                           % (method,))
            if method == 'CHAP' and not (origin.data.get('auth_username')
                                         and origin.data.get(
                                             'auth_password')):
                raise exception.InvalidOrigin(
                    reason='a CHAP origin needs auth_username and '
                           'auth_password')

    def can_relay(self, image_id, origin):
        """Only NBD origins relay (children read the parent's NBD export
        under the same name), and only those exporting the image under
        its id: the forwarder swaps servers under a graph whose export
        name never changes."""
        if origin.driver_volume_type != 'nbd':
            return False
        export = origin.data.get('export')
        if export != image_id:
            raise exception.InvalidOrigin(
                reason='in a relay tree the origin must export the image '
                       'under its id %s (it exports %r)' % (image_id, export))
        try:
            upstream.describe(origin)
        except exception.BackendError as e:
            raise exception.InvalidOrigin(reason=e.kwargs.get('reason'))
        return True

    def relay_address(self, image_id, taken):
        """A port of ``[relay] port_min..port_max`` that no other template
        has and that nothing else listens on now."""
        host = self.conf.relay.listen_address
        try:
            family = (socket.AF_INET6 if ipaddress.ip_address(host).version
                      == 6 else socket.AF_INET)
        except ValueError:
            raise exception.BackendError(
                reason='[relay] listen_address %r must be an IP address '
                       'for the qemu driver' % (host,))
        used = {address.port for address in taken}
        for port in range(self.conf.relay.port_min,
                          self.conf.relay.port_max + 1):
            if port in used:
                continue
            try:
                with socket.socket(family) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, port))
            except OSError:
                continue
            return records.RelayAddress(host, port, image_id)
        raise exception.BackendError(
            reason='no free relay port in %d-%d on %s'
                   % (self.conf.relay.port_min, self.conf.relay.port_max,
                      host))

    def parent_source(self, node, address, image_id):
        """The parent's export, checked (InvalidAddress): an IP address
        literal in [relay] peer_networks, a relay port, the image id as
        export name (a parent exports the image under its id)."""
        return records.Source(node, records.Endpoint(
            'nbd', self._parent_data(image_id, address.host, address.port,
                                     address.export)))

    def probe_source(self, source, image_format):
        """Inspect the source's content, then ``qemu-img info`` of it
        through *image_format*.

        The image must be what it claims and name no backing or data file
        (:mod:`thunder_agent.image_check`): a file origin is inspected as a
        file, an NBD source on its first bytes, and qemu-img (told not to
        open a backing file) must agree; an iSCSI source is judged by
        qemu-img alone. Raises UnsafeImage (an OriginUnavailable) for a
        refused image, before anything is created.
        """
        endpoint = self._endpoint(source)
        label = (endpoint.data.get('export')
                 or os.path.basename(endpoint.data.get('path') or '')
                 or source.node)
        kind = endpoint.driver_volume_type
        if kind == 'file':
            image_check.check_file(endpoint.data['path'], image_format,
                                   label, self._qemu_probe)
        elif kind == 'nbd':
            image_check.check_head(self._head(endpoint, label),
                                   image_format, label, self._qemu_probe)
        opts = {'driver': image_format,
                'file': self._protocol(endpoint, probe=True)}
        if image_format == 'qcow2':
            opts['backing'] = None
        args = ['info', '--output=json', '-U']
        if 'tls-creds' in opts['file']:
            args += ['--object', json.dumps(self._tls().client_creds())]
        secret = self._secret(endpoint)
        with _secret_pipe(secret) as fd:
            if fd is not None:
                # The password reaches qemu-img through a pipe, never its
                # command line.
                args += ['--object', 'secret,id=probe-secret,file=/dev/fd/%d'
                         % fd]
                opts['file']['password-secret'] = 'probe-secret'
            args.append('json:' + json.dumps(opts))
            try:
                proc = self._qemu_img(args,
                                      pass_fds=(fd,) if fd is not None
                                      else ())
            except exception.BackendError as e:
                raise exception.OriginUnavailable(
                    image_id=label, reason=e.kwargs.get('reason'))
        try:
            info = json.loads(proc.stdout)
            size = int(info['virtual-size'])
        except (ValueError, KeyError, TypeError):
            raise exception.OriginUnavailable(
                image_id=label, reason='qemu-img info said %r'
                                       % proc.stdout[:200])
        image_check.check_qemu_info(info, image_format, label)
        return base.OriginInfo(size=size, image_format=image_format)

    def _head(self, endpoint, label):
        """The first bytes of an NBD source (image_check.HEAD_SIZE or the
        whole export when smaller), within [qemu] command_timeout."""
        deadline = self._clock() + self.conf.qemu.command_timeout
        handle = None
        try:
            handle = self._nbd_connect(endpoint.data, deadline)
            data = bytearray(min(image_check.HEAD_SIZE, handle.get_size()))
            cookie = handle.aio_pread(nbd.Buffer.from_buffer(data), 0)
            self._nbd_wait(handle,
                           lambda: handle.aio_command_completed(cookie),
                           deadline)
            return bytes(data)
        except nbd.Error as e:
            reason = 'reading its first bytes failed: %s' % e
        except _Refused:
            reason = 'the server does not export it'
        except _Timeout:
            reason = ('reading its first bytes took more than %s s'
                      % self.conf.qemu.command_timeout)
        finally:
            # Dropping the handle closes the connection.
            handle = None
        raise exception.OriginUnavailable(image_id=label, reason=reason)

    def _nbd_connect(self, data, deadline):
        """A libnbd handle connected to the NBD export *data* by
        *deadline*; nbd.Error, _Refused or _Timeout otherwise."""
        handle = self._nbd()
        if 'socket' not in data and self._tls() is not None:
            self._tls().secure(handle)
        handle.set_export_name(data.get('export', ''))
        if 'socket' in data:
            handle.aio_connect_unix(data['socket'])
        else:
            handle.aio_connect_tcp(data['host'], str(data['port']))
        self._nbd_wait(handle, lambda: not handle.aio_is_connecting(),
                       deadline)
        if not handle.aio_is_ready():
            raise _Refused()
        return handle

    def _nbd_wait(self, handle, done, deadline):
        while not done():
            left = deadline - self._clock()
            if left <= 0:
                raise _Timeout()
            handle.poll(max(1, int(min(left, 1.0) * 1000)))

    def source_ready(self, source):
        """For NBD, the server negotiates the export and serves its first
        sector, within ``[relay] parent_probe_timeout``. (A parent's TLS
        exporter negotiates on its own: a template daemon behind it that
        hangs shows only when data is asked for.)"""
        endpoint = self._endpoint(source)
        if endpoint.driver_volume_type != 'nbd':
            return self.source_answers(
                source, self.conf.relay.parent_probe_timeout)
        deadline = self._clock() + self.conf.relay.parent_probe_timeout
        try:
            handle = self._nbd_connect(endpoint.data, deadline)
            if handle.get_size() <= 0:
                return False
            buf = nbd.Buffer(512)
            cookie = handle.aio_pread(buf, 0)
            self._nbd_wait(handle,
                           lambda: handle.aio_command_completed(cookie),
                           deadline)
            return True
        except (nbd.Error, _Refused, _Timeout):
            return False

    def source_answers(self, source, timeout):
        endpoint = self._endpoint(source)
        data = endpoint.data
        try:
            if endpoint.driver_volume_type == 'file':
                return os.access(data['path'], os.R_OK)
            if 'socket' in data:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(timeout)
                    s.connect(data['socket'])
                return True
            if endpoint.driver_volume_type == 'iscsi':
                host, _, port = data['target_portal'].rpartition(':')
                address = (host.strip('[]'), int(port))
            else:
                address = (data['host'], int(data['port']))
            with socket.create_connection(address, timeout=timeout):
                return True
        except (OSError, ValueError):
            return False

    # -- templates -------------------------------------------------------
    def create_template(self, template, template_dir):
        state = dict(template.driver_state)
        state.update(hit_base=0, hit_last=0)
        return self._build(template, template_dir, state)

    def _graph(self, template, cache, endpoint):
        """QMP calls building the template's graph over *endpoint*."""
        calls = []
        source = dict(self._protocol(endpoint), **{'node-name': 'source'})
        # A TCP source has tls-creds (see _protocol); a forwarded one is
        # the verifier's plain local socket, the verifier being the TLS
        # client of the parent and the origin.
        if 'tls-creds' in source:
            calls.append(('object-add', self._tls().client_creds()))
        secret = self._secret(endpoint)
        if secret is not None:
            # Over QMP, not on a command line.
            calls.append(('object-add', {'qom-type': 'secret',
                                         'id': 'source-secret',
                                         'data': secret}))
            source['password-secret'] = 'source-secret'
        calls += [
            ('blockdev-add', source),
            ('blockdev-add', self._format_node(template.image_format,
                                               'origin', 'source')),
            ('blockdev-add', {'driver': 'file', 'node-name': 'cache-file',
                              'filename': cache}),
            ('blockdev-add', {'driver': 'qcow2', 'node-name': 'cache',
                              'file': 'cache-file', 'backing': 'origin'}),
            ('blockdev-add', {'driver': 'copy-on-read',
                              'node-name': 'template', 'file': 'cache'}),
            ('block-export-add', {'type': 'nbd', 'id': EXPORT_ID,
                                  'node-name': 'template',
                                  'name': template.image_id,
                                  'writable': False}),
        ]
        return calls

    def _recover_cache(self, template, template_dir, cache, daemon):
        """Verify a cache no daemon holds that was not shut down cleanly
        (:mod:`~thunder_agent.drivers.qemu.recovery`), before any reader
        sees it; the recovery's Result, or None when there was nothing to
        do."""
        exists = os.path.exists(cache)
        running = daemon.is_running()
        clean = exists and recovery.is_clean(template_dir, cache)
        manifest = os.path.join(template_dir, MANIFEST_FILE)
        if (exists and not running and not clean
                and not os.path.exists(manifest)
                and template.origin.driver_volume_type == 'nbd'):
            # A template that does not relay fetches the manifest only
            # now, when its cache needs checking (from the origin, as
            # always): without it the whole cache would be discarded.
            self._fetch_manifest(template, template_dir)
        action = recovery.decide(running, exists, clean,
                                 os.path.exists(manifest))
        if action == recovery.NOTHING:
            return None
        return self._recovery.recover(template.image_id, template_dir, cache,
                                      template.size)

    def _build(self, template, template_dir, state):
        """Start the daemon and build the graph over the cache in
        *template_dir* (made when missing); *state* becomes the new
        driver_state."""
        if self._relay_of(template) is not None and (
                template.image_format != 'raw'):
            # Children read this template's raw export through the same
            # format node after a re-parent.
            raise exception.BackendError(
                reason='a relaying template reads raw sources, not %s'
                       % template.image_format)
        source = template.source.endpoint
        if source.driver_volume_type == 'file':
            # Again at every build: the graph opens the file by its path,
            # and reading a header is cheap. (A remote source was inspected
            # by probe_source when the template was created.)
            image_check.check_file(source.data['path'],
                                   template.image_format, template.image_id,
                                   self._qemu_probe)
        if (self._relay_of(template) is not None
                and template.origin.driver_volume_type == 'nbd'
                and not os.path.exists(os.path.join(template_dir,
                                                    MANIFEST_FILE))):
            # Before any parent is read: its bytes are checked against it.
            self._fetch_manifest(template, template_dir)
        cache = os.path.join(template_dir, CACHE_FILE)
        daemon = self._daemon(template.image_id)
        # A daemon left by a build that never finished holds the names
        # (and the cache): it goes before the cache is judged.
        daemon.stop()
        self._recover_cache(template, template_dir, cache, daemon)
        fresh = not os.path.exists(cache)
        if fresh:
            self._qemu_img(['create', '-q', '-f', 'qcow2', '-o',
                            'cluster_size=%d' % self.cluster_size, cache,
                            str(template.size)])
            state['cluster_size'] = self.cluster_size
        # What the cache held when this daemon started: the origin file
        # reads it makes from here on are fetches, not hits.
        state['fetch_base'] = 0 if fresh else self._fetched(cache)
        # The daemon writes the cache from here: a power cut must find it
        # unmarked.
        recovery.clear_marker(template_dir)
        try:
            daemon.start(nbd_server=self._listener(template),
                         max_connections=self._server_cap(template))
            daemon.commands(*self._graph(
                template, cache, self._graph_endpoint(template,
                                                      template_dir)))
            if self._listens(template):
                self._ensure_relay_listener(template)
        except Exception:
            with excutils.save_and_reraise_exception():
                LOG.error('Template %s: building its graph failed: %s',
                          template.image_id, daemon.log_tail())
                daemon.stop()
                self._upstream(template.image_id).stop()
                self._relay_listener(template.image_id).stop()
        LOG.info('Template %s serves at %s', template.image_id,
                 self._local(template))
        return base.TemplateBuild(export=self._export(template),
                                  driver_state=state)

    def ensure_template(self, template, template_dir):
        daemon = self._daemon(template.image_id)
        if daemon.is_running():
            try:
                exports = daemon.command('query-block-exports')
            except exception.BackendError as e:
                LOG.warning('Template %s: %s', template.image_id, e)
                exports = []
            if any(e.get('id') == EXPORT_ID for e in exports):
                # A dead forwarder is restarted in place; the daemon's NBD
                # client reconnects to it by itself, children to the
                # listener.
                if self._forwards(template):
                    self._ensure_forwarder(template, template_dir)
                if self._listens(template):
                    self._ensure_relay_listener(template)
                # It holds the cache open read-write.
                recovery.clear_marker(template_dir)
                LOG.info('Re-adopted running template %s', template.image_id)
                return base.TemplateBuild(export=self._export(template))
            LOG.warning('Template daemon %s is incomplete; rebuilding',
                        template.image_id)
            daemon.stop()
        LOG.info('Rebuilding template %s from its cache', template.image_id)
        state = dict(template.driver_state)
        # The cache-hit bytes of a daemon that is gone go into the base.
        state['hit_base'] = (state.get('hit_base', 0)
                             + state.get('hit_last', 0))
        state['hit_last'] = 0
        return self._build(template, template_dir, state)

    def set_sources(self, template, template_dir, sources):
        """Point the template at another parent: swap the forwarder.

        NBD has no multipath; the first source is used (the coordinator
        lists parents in preference order).
        """
        if self._relay_of(template) is None:
            raise exception.BackendError(
                reason='template %s does not take part in a relay tree'
                       % template.image_id)
        if not sources:
            raise exception.BackendError(
                reason='template %s: no source given' % template.image_id)
        # Every source is checked, though only the first is used: each is
        # an address from outside (InvalidAddress, InvalidSource).
        endpoints = [self._endpoint(source, template.image_id,
                                    template.origin) for source in sources]
        endpoint = endpoints[0]
        if (endpoint.driver_volume_type != 'nbd'
                or endpoint.data.get('export') != template.image_id):
            raise exception.BackendError(
                reason='template %s reads NBD exports named %s only'
                       % (template.image_id, template.image_id))
        self._point_upstream(template, template_dir, endpoint)
        return None

    def set_children(self, template, template_dir, children):
        """Admit exactly *children* to the template's relay export (TLS
        client certificates with CN=<node id>), from their next connection
        on. Nothing to do with TLS off: the relay listener's range filter
        is all there is."""
        if self.conf.tls.enabled and self._listens(template):
            self._ensure_relay_export(template, list(children))
        return None

    def delete_template(self, template, template_dir):
        daemon = self._daemon(template.image_id)
        # A crash before the files go leaves the template to be rebuilt
        # from them: a cache flushed and closed needs no verifying then.
        recovery.stop_cleanly(
            daemon, template_dir, os.path.join(template_dir, CACHE_FILE),
            lambda: self.flush_template(template, template_dir),
            self.conf.qemu.flush_timeout)
        daemon.remove_log()
        try:
            exporter = self._relay_export(template.image_id)
        except exception.BackendError:
            exporter = None     # its sockets never fitted the run path
        if exporter is not None:
            exporter.stop()
            exporter.remove_log()
        up = self._upstream(template.image_id)
        up.stop()
        up.remove_log()
        listener = self._relay_listener(template.image_id)
        listener.stop()
        listener.remove_log()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._socket(template.image_id))

    def is_healthy(self, template, template_dir):
        if not self._daemon(template.image_id).is_running():
            return False
        try:
            if self._listens(template) and not self._relay_listener(
                    template.image_id).points_at(
                        *self._listener_args(template)):
                return False
            if (self._listens(template) and self.conf.tls.enabled
                    and not self._relay_export(
                        template.image_id).is_running()):
                return False
            if self._forwards(template):
                return self._upstream_is(
                    template, template_dir,
                    self._endpoint(template.source, template.image_id,
                                   template.origin))
        except exception.ThunderException as e:
            LOG.warning('Template %s: %s', template.image_id, e)
            return False
        return True

    def flush_template(self, template, template_dir):
        """Flush the cache's metadata to disk through the export, within
        ``[qemu] flush_timeout``.

        Copy-on-read fills are written to the cache like any write; their
        qcow2 mappings reach the disk on a flush. An NBD flush on the
        (read-only) export flushes the whole graph below it.
        """
        timeout = self.conf.qemu.flush_timeout
        deadline = self._clock() + timeout
        handle = error = None
        try:
            handle = self._nbd_connect(self._reader_local(template),
                                       deadline)
            cookie = handle.aio_flush()
            self._nbd_wait(handle,
                           lambda: handle.aio_command_completed(cookie),
                           deadline)
        except nbd.Error as e:
            error = 'failed: %s' % e
        except _Refused:
            error = 'failed: its export is gone'
        except _Timeout:
            error = 'did not finish within %s s' % timeout
        # Dropping the handle closes the connection (a hung daemon keeps
        # no client of ours).
        handle = None
        if error is not None:
            raise exception.BackendError(
                reason='flush of template %s %s' % (template.image_id,
                                                    error))

    def _fetched(self, cache):
        """Bytes present in the cache file (qemu-img map)."""
        proc = self._qemu_img(['map', '--output=json', '-U', '-f', 'qcow2',
                               cache])
        try:
            extents = json.loads(proc.stdout)
        except ValueError:
            raise exception.BackendError(
                reason='qemu-img map said %r' % proc.stdout[:200])
        # The cache has no backing in its header: what is present is in
        # the file.
        return sum(e['length'] for e in extents
                   if e.get('present') and e.get('depth', 0) == 0)

    def template_stats(self, template, template_dir):
        cache = os.path.join(template_dir, CACHE_FILE)
        daemon = self._daemon(template.image_id)
        if daemon.is_running():
            try:
                self.flush_template(template, template_dir)
            except exception.BackendError as e:
                LOG.warning('Stats of template %s may miss recent fills: '
                            '%s', template.image_id, e)
        # Copy-on-read is the only writer of the cache, so every byte in
        # it was fetched from a source exactly once.
        fetched = self._fetched(cache)
        # A read is served either by a fetch (counted above) or from the
        # cache file. The daemon's rchar counts exactly its file reads
        # (socket reads are recvmsg and do not count), so it is the
        # cache-hit volume plus a little qcow2 metadata, and for a file
        # source also the fetches this daemon made.
        state = dict(template.driver_state)
        io = daemon.io_counters()
        if io is not None:
            hits = io.get('rchar', 0)
            if template.source.endpoint.driver_volume_type == 'file':
                hits -= fetched - state.get('fetch_base', 0)
            state['hit_last'] = max(0, hits)
        hits = state.get('hit_base', 0) + state.get('hit_last', 0)
        block = state.get('cluster_size', self.cluster_size)
        # The verifier's counters, since the current source was set.
        verified = (self._upstream(template.image_id).verifier_stats()
                    if self._forwards(template) else None) or {}
        stats = base.TemplateStats(
            bytes_fetched=fetched, bytes_served=fetched + hits,
            cached_bytes=fetched, blocks_cached=fetched // block,
            block_size=block, disk_bytes=self.disk_usage(template,
                                                         template_dir),
            bytes_from_parents=_counter(verified, 'parent_bytes'),
            bytes_from_origin=_counter(verified, 'origin_bytes'),
            blocks_rejected=_counter(verified, 'blocks_rejected'))
        return stats, (state if state != template.driver_state else None)

    def disk_usage(self, template, template_dir):
        try:
            return os.stat(os.path.join(template_dir,
                                        CACHE_FILE)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def cache_capacity(self, template, template_dir):
        """The cache file with every cluster of the image allocated:
        :func:`qcow2_full_size` of the template's (virtual) size at the
        cache's cluster size, plus CAPACITY_SPARE_CLUSTERS."""
        cluster = template.driver_state.get('cluster_size',
                                            self.cluster_size)
        return (qcow2_full_size(template.size, cluster)
                + CAPACITY_SPARE_CLUSTERS * cluster)

    def prefetch_target(self, template, template_dir):
        return prefetch.NbdAddress(**self._reader_local(template))

    # -- snapshots -------------------------------------------------------
    def _connection_info(self, template, instance_id, snapshot_dir):
        """What nova_thunder's libvirt volume driver reads: the overlay
        and its NBD backing (a socket, or host and port)."""
        return {'driver_volume_type': 'thunder',
                'data': {'backend': self.name,
                         'image_id': template.image_id,
                         'instance_id': instance_id,
                         'path': os.path.join(snapshot_dir, OVERLAY_FILE),
                         'format': 'qcow2',
                         'backing': dict(self._reader_local(template),
                                         driver='nbd', format='raw',
                                         reconnect_delay=(
                                             self.reconnect_delay))}}

    def _backing_filename(self, template):
        local = self._reader_local(template)
        if 'socket' in local:
            server = {'type': 'unix', 'path': local['socket']}
        else:
            server = {'type': 'inet', 'host': local['host'],
                      'port': str(local['port'])}
        return 'json:' + json.dumps({'driver': 'raw', 'file': {
            'driver': 'nbd', 'server': server, 'export': local['export'],
            'reconnect-delay': self.reconnect_delay}})

    def create_snapshot(self, template, template_dir, instance_id,
                        snapshot_dir):
        overlay = os.path.join(snapshot_dir, OVERLAY_FILE)
        try:
            self._qemu_img(['create', '-q', '-f', 'qcow2', '-F', 'raw',
                            '-b', self._backing_filename(template), '-o',
                            'cluster_size=%d' % self.cluster_size, overlay,
                            str(template.size)])
        except exception.BackendError:
            with excutils.save_and_reraise_exception():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(overlay)
        return self._connection_info(template, instance_id, snapshot_dir)

    def ensure_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        if not os.path.exists(os.path.join(snapshot_dir, OVERLAY_FILE)):
            raise exception.BackendError(
                reason='overlay of instance %s is missing'
                       % snapshot.instance_id)
        return self._connection_info(template, snapshot.instance_id,
                                     snapshot_dir)

    def snapshot_users(self, template, snapshot, snapshot_dir):
        """The processes holding the overlay open (a VM's QEMU, a
        qemu-img), from /proc/*/fd: the agent runs as root."""
        overlay = os.path.realpath(os.path.join(snapshot_dir, OVERLAY_FILE))
        users = processes_holding(overlay)
        if not users:
            return None
        return '%s %s ha%s the overlay %s open' % (
            'process' if len(users) == 1 else 'processes',
            ', '.join('%d (%s)' % user for user in users),
            's' if len(users) == 1 else 've', overlay)

    def delete_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        reason = self.snapshot_users(template, snapshot, snapshot_dir)
        if reason:
            raise exception.SnapshotInUse(instance_id=snapshot.instance_id,
                                          reason=reason)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(snapshot_dir, OVERLAY_FILE))


def _counter(values, key):
    value = values.get(key)
    return value if isinstance(value, int) and value >= 0 else 0


@contextlib.contextmanager
def _secret_pipe(secret):
    """The read end of a pipe holding *secret* (None without one), for a
    child's ``secret,file=/dev/fd/N`` object."""
    if secret is None:
        yield None
        return
    read, write = os.pipe()
    try:
        with os.fdopen(write, 'w') as f:
            f.write(secret)
        yield read
    finally:
        os.close(read)


def processes_holding(path):
    """``[(pid, command name)]`` of the processes with *path* open."""
    users = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        fd_dir = '/proc/%s/fd' % name
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target == path:
                try:
                    with open('/proc/%s/comm' % name) as f:
                        comm = f.read().strip()
                except OSError:
                    comm = '?'
                users.append((int(name), comm))
                break
    return sorted(users)
