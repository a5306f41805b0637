"""The agent as a long-running service: RPC server plus housekeeping."""

import logging
import threading

from oslo_service import service

from thunder_agent import manager as agent_manager
from thunder_agent import rpc
from thunder_agent.rpc import server as rpc_server

LOG = logging.getLogger(__name__)


class AgentService(service.Service):
    def __init__(self, conf):
        super().__init__()
        self.conf = conf
        self.manager = agent_manager.AgentManager(conf)
        self._stopping = threading.Event()
        self._housekeeper = None
        self.rpc_server = None

    def start(self):
        super().start()
        self.manager.start()
        transport = rpc.get_transport(self.conf)
        self.rpc_server = rpc_server.get_server(
            transport, self.manager, self.conf.agent.topic, self.conf.host)
        self.rpc_server.start()
        self._housekeeper = threading.Thread(
            target=self._housekeeping_loop, name='housekeeping', daemon=True)
        self._housekeeper.start()
        LOG.info('thunder-agent %s listening on topic %s (backend %s)',
                 self.conf.host, self.conf.agent.topic,
                 self.manager.backend.name)

    def _housekeeping_loop(self):
        interval = min(self.conf.agent.housekeeping_interval,
                       self.conf.cache.flush_interval)
        while not self._stopping.wait(interval):
            try:
                self.manager.housekeeping()
            except Exception:
                LOG.exception('Housekeeping failed')

    def wait(self):
        while not self._stopping.wait(1):
            pass

    def stop(self, graceful=False):
        self._stopping.set()
        if self.rpc_server is not None:
            self.rpc_server.stop()
            self.rpc_server.wait()
        self.manager.stop()
        super().stop(graceful)
