"""A whole thunder deployment on one machine, for tests, demo and bench.

RabbitMQ on the root namespace's loopback (reachable from every host
through :mod:`thunder_lab.emulation.cluster`'s port exposure), a
thunder-coordinator, an origin host serving one image over NBD (the real
``thunder-origin`` command, run inside the origin host's namespace), and
one thunder-agent per compute host, each inside its own network namespace
with relaying enabled and its exports on the host's cluster address.

With ``tls`` (the default, as in production) the cluster has a CA of its
own (:mod:`thunder_lab.pki`, certtool) and every node its credentials:
the origin host's certificate names its address, each compute host's its
name (the agent's ``[DEFAULT] host``) and its cluster address. Without it,
every TCP NBD link is plain and coordinator calls are unsigned: the
"security off" side of ``thunder-bench``.
"""

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from oslo_utils import excutils

from thunder_agent.drivers.qemu import storage_daemon
from thunder_lab.emulation import agent as agent_mod
from thunder_lab.emulation import cluster as cluster_mod
from thunder_lab.emulation import coordinator as coordinator_mod
from thunder_lab.emulation import rabbitmq
from thunder_lab import pki

ORIGIN_PORT = 10809


class OriginProcess:
    """``thunder-origin`` serving *image* as *export* on *host*'s address.

    It runs as ``python -m thunder_agent.cmd.origin`` under ``ip netns
    exec``, so the daemon's listening socket (with TCP_NODELAY) is made
    inside the host's namespace. The command prints the origin's
    connection info (JSON) once it serves and stops its daemon on SIGTERM.
    Bytes the origin read are its daemon's ``rchar`` (the daemon is found
    through its pid file in *run_path*).
    """

    def __init__(self, host, image, image_format, export, port, run_path,
                 start_timeout=60, tls_dir=None):
        """*tls_dir*: the origin host's ``[tls] certificates_dir``; None
        serves plain NBD (``--no-tls``)."""
        self.host = host
        self.tls_dir = tls_dir
        self.image = image
        self.image_format = image_format
        self.export = export
        self.port = port
        self.run_path = run_path
        self.start_timeout = start_timeout
        self.log_path = os.path.join(run_path, 'thunder-origin.log')
        # thunder-origin names its daemon after the export.
        self.daemon = storage_daemon.StorageDaemon('origin-%s' % export,
                                                   run_path)
        self.proc = None
        self._connection = None

    def start(self):
        os.makedirs(self.run_path, exist_ok=True)
        argv = [sys.executable, '-m', 'thunder_agent.cmd.origin',
                '--image', self.image, '--format', self.image_format,
                '--export', self.export,
                '--listen', 'tcp:%s:%d' % (self.host.address, self.port),
                '--run-path', self.run_path]
        if self.tls_dir:
            argv += ['--tls-certificates-dir', self.tls_dir]
        else:
            argv += ['--no-tls']
        with open(self.log_path, 'ab') as log:
            self.proc = self.host.popen(argv, stdout=subprocess.PIPE,
                                        stderr=log, start_new_session=True)
        try:
            self._connection = json.loads(self._first_line())
        except Exception:
            with excutils.save_and_reraise_exception():
                self.stop()
        return self

    def _first_line(self):
        deadline = time.monotonic() + self.start_timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.5):
                    line = self.proc.stdout.readline()
                    if line:
                        return line.decode()
                    break
                if self.proc.poll() is not None:
                    break
        raise RuntimeError('thunder-origin did not serve (exit %s): %s'
                           % (self.proc.poll(), self.log_tail()))

    def log_tail(self, size=2000):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read()[-size:].decode(errors='replace')
        except OSError:
            return ''

    def connection(self):
        """The origin as the agent's ``origin`` argument expects it."""
        return json.loads(json.dumps(self._connection))

    def bytes_read(self):
        """Bytes the origin daemon has read so far (image data it served,
        plus a few bytes per request of protocol and control traffic)."""
        counters = self.daemon.io_counters()
        return counters['rchar'] if counters else None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.proc.stdout.close()
        # A command that was killed left its (daemonized) server behind.
        self.daemon.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ThunderCluster:
    def __init__(self, hosts, image, bandwidth_mbit=None, fan_out=2,
                 image_id=None, image_format='raw', agent_options=None,
                 coordinator_options=None, rabbit=None, tls=True):
        self.n_hosts = hosts
        self.tls = tls
        self.ca = None
        self.image = image
        self.image_format = image_format
        self.image_id = image_id or str(uuid.uuid4())
        self.bandwidth_bps = (None if bandwidth_mbit is None
                              else int(bandwidth_mbit * 1000 * 1000))
        self.fan_out = fan_out
        self.agent_options = agent_options or {}
        self.coordinator_options = coordinator_options or {}
        self.rabbit = rabbit
        self._own_rabbit = rabbit is None
        self.cluster = None
        self.coordinator = None
        self.origin = None
        self.agents = {}
        self.workdir = None

    @property
    def size(self):
        return os.path.getsize(self.image)

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self):
        self.workdir = tempfile.mkdtemp(prefix='thc-', dir='/tmp')
        if self.rabbit is None:
            self.rabbit = rabbitmq.RabbitMQ().start()
        self.cluster = cluster_mod.Cluster(
            hosts=self.n_hosts, bandwidth_bps=self.bandwidth_bps,
            expose_ports=[self.rabbit.port]).start()
        topic = 'thunder-coordinator-%s' % self.cluster.id
        coord_opts = {'coordinator': {'topic': topic,
                                      'fan_out': self.fan_out,
                                      'heartbeat_interval': 2,
                                      'node_timeout': 10},
                      'tls': self._tls_options('coordinator', [])}
        for group, values in self.coordinator_options.items():
            coord_opts.setdefault(group, {}).update(values)
        self.coordinator = coordinator_mod.CoordinatorProcess(
            self.rabbit.transport_url, os.path.join(self.workdir, 'coord'),
            topic=topic, options=coord_opts).start()
        self.coordinator_options = coord_opts
        self.origin = OriginProcess(
            self.cluster.origin, self.image, self.image_format,
            self.image_id, ORIGIN_PORT,
            os.path.join(self.workdir, 'origin'),
            tls_dir=self.credentials(self.cluster.origin)).start()
        for host in self.cluster.hosts:
            options = {
                # Origins on the origin host only (any port: it runs
                # nothing but origins, e.g. the benchmark's per run).
                'agent': {'nbd_origin_networks':
                          '%s/32' % self.cluster.origin.address,
                          'nbd_origin_ports': '1-65535'},
                'relay': {'enabled': 'true',
                          'listen_address': host.address},
                'coordinator': {'topic': topic, 'rpc_timeout': 10},
                'qemu': {'reconnect_delay': 120},
                'tls': self._tls_options(host.name, [host.address]),
            }
            for group, values in self.agent_options.items():
                options.setdefault(group, {}).update(values)
            self.agents[host.name] = agent_mod.AgentProcess(
                self.rabbit.transport_url,
                os.path.join(self.workdir, host.name), host=host.name,
                options=options, netns=host.netns).start()

    def _tls_options(self, node, ips):
        if not self.tls:
            return {'enabled': 'false'}
        return {'enabled': 'true',
                'certificates_dir': self._issue(node, ips)}

    def _issue(self, node, ips):
        if self.ca is None:
            self.ca = pki.CA.create(os.path.join(self.workdir, 'pki', 'ca'))
        return self.ca.issue(node, os.path.join(self.workdir, 'pki', node),
                             ips=ips)

    def credentials(self, host):
        """The ``[tls] certificates_dir`` of emulated *host* (made on first
        use), or None without TLS."""
        if not self.tls:
            return None
        path = os.path.join(self.workdir, 'pki', host.name)
        if os.path.isdir(path):
            return path
        return self._issue(host.name, [host.address])

    def origin_connection(self):
        return self.origin.connection()

    def prepare(self, host, instance_id=None):
        """Template + snapshot on *host*; returns connection_info."""
        return self.agents[host].client.prepare(
            self.image_id, self.origin_connection(), self.size, 'raw',
            instance_id or str(uuid.uuid4()))

    def start_reader(self, host, connection_info):
        """Read a whole snapshot inside *host*; returns the process (its
        stdout is one JSON line, see :func:`finish_reader`)."""
        h = self.cluster.host(host)
        return subprocess.Popen(
            h.exec_prefix + [sys.executable, '-m',
                             'thunder_lab.emulation.reader',
                             json.dumps(connection_info)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def finish_reader(proc, timeout=600):
        out, err = proc.communicate(timeout=timeout)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {'sha256': None, 'bytes': 0, 'error': err[-2000:]}

    def tree(self):
        return self.coordinator.client.get_tree(self.image_id)

    def stop(self):
        for agent in self.agents.values():
            agent.teardown()
        self.agents = {}
        if self.origin is not None:
            self.origin.stop()
            self.origin = None
        if self.coordinator is not None:
            self.coordinator.stop()
            self.coordinator = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self._own_rabbit and self.rabbit is not None:
            self.rabbit.stop()
            self.rabbit = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
