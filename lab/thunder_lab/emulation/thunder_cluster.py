"""A whole thunder deployment on one machine, for tests, demo and bench.

RabbitMQ on the root namespace's loopback (reachable from every host
through :mod:`thunder_lab.emulation.cluster`'s port exposure), a
thunder-coordinator, an origin host serving one image over NBD, and one
thunder-agent per compute host, each inside its own network namespace with
relaying enabled and its exports on the host's cluster address.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

from thunder_agent import origin as origin_mod
from thunder_lab.emulation import agent as agent_mod
from thunder_lab.emulation import cluster as cluster_mod
from thunder_lab.emulation import coordinator as coordinator_mod
from thunder_lab.emulation import rabbitmq

ORIGIN_PORT = 10809


class ThunderCluster:
    def __init__(self, hosts, image, bandwidth_mbit=None, fan_out=2,
                 image_id=None, image_format='raw', agent_options=None,
                 coordinator_options=None, rabbit=None):
        self.n_hosts = hosts
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
                                      'node_timeout': 10}}
        for group, values in self.coordinator_options.items():
            coord_opts.setdefault(group, {}).update(values)
        self.coordinator = coordinator_mod.CoordinatorProcess(
            self.rabbit.transport_url, os.path.join(self.workdir, 'coord'),
            topic=topic, options=coord_opts).start()
        self.coordinator_options = coord_opts
        origin_host = self.cluster.origin
        self.origin = origin_mod.OriginServer(
            self.image, self.image_format, self.image_id,
            {'type': 'inet', 'host': origin_host.address,
             'port': ORIGIN_PORT},
            os.path.join(self.workdir, 'origin'), netns=origin_host.netns)
        self.origin.start()
        for host in self.cluster.hosts:
            options = {
                'relay': {'enabled': 'true',
                          'listen_address': host.address},
                'coordinator': {'topic': topic, 'rpc_timeout': 10},
                'qemu': {'reconnect_delay': 120},
            }
            for group, values in self.agent_options.items():
                options.setdefault(group, {}).update(values)
            self.agents[host.name] = agent_mod.AgentProcess(
                self.rabbit.transport_url,
                os.path.join(self.workdir, host.name), host=host.name,
                options=options, netns=host.netns).start()

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
