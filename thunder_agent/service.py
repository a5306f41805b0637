"""The agent as a long-running service: RPC server plus housekeeping."""

import logging

from thunder_agent import manager as agent_manager
from thunder_agent.rpc import server as rpc_server
from thunder_agent import service_base

LOG = logging.getLogger(__name__)


class AgentService(service_base.RPCService):
    name = 'thunder-agent'

    def make_manager(self):
        manager = agent_manager.AgentManager(self.conf)
        manager.start()
        return manager

    def make_server(self, transport):
        server = rpc_server.get_server(transport, self.manager,
                                       self.conf.agent.topic, self.conf.host)
        LOG.info('thunder-agent %s listening on topic %s (backend %s)',
                 self.conf.host, self.conf.agent.topic,
                 self.manager.backend.name)
        return server

    def interval(self):
        return min(self.conf.agent.housekeeping_interval,
                   self.conf.cache.flush_interval)

    def periodic(self):
        self.manager.housekeeping()

    def stop(self, graceful=False):
        super().stop(graceful)
        if self.manager is not None:
            self.manager.stop()
