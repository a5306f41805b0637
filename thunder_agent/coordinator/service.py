"""The coordinator as a long-running service: RPC server plus expiry."""

import logging
import threading

from oslo_service import service

from thunder_agent.coordinator import manager as coordinator_manager
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import rpc

LOG = logging.getLogger(__name__)


class CoordinatorService(service.Service):
    def __init__(self, conf):
        super().__init__()
        self.conf = conf
        self.manager = None
        self.rpc_server = None
        self._stopping = threading.Event()
        self._expiry = None

    def start(self):
        super().start()
        # Built here, in the worker process, as the trees are per process.
        self.manager = coordinator_manager.CoordinatorManager.from_conf(
            self.conf)
        transport = rpc.get_transport(self.conf)
        self.rpc_server = coordinator_rpc.get_server(
            transport, self.manager, self.conf.coordinator.topic,
            self.conf.host)
        self.rpc_server.start()
        self._expiry = threading.Thread(target=self._expiry_loop,
                                        name='expiry', daemon=True)
        self._expiry.start()
        LOG.info('thunder-coordinator %s listening on topic %s (policy %s, '
                 'fan-out %d)', self.conf.host, self.conf.coordinator.topic,
                 self.conf.coordinator.policy, self.conf.coordinator.fan_out)

    def _expiry_loop(self):
        # Children of a silent node are moved within a second or so of its
        # timeout rather than at the next unrelated call.
        interval = min(1.0, self.conf.coordinator.heartbeat_interval / 2.0)
        while not self._stopping.wait(interval):
            try:
                self.manager.expire()
            except Exception:
                LOG.exception('Expiry of silent nodes failed')

    def wait(self):
        while not self._stopping.wait(1):
            pass

    def stop(self, graceful=False):
        self._stopping.set()
        if self.rpc_server is not None:
            self.rpc_server.stop()
            self.rpc_server.wait()
        super().stop(graceful)
