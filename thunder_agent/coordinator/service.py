"""The coordinator as a long-running service: RPC server plus expiry."""

from oslo_log import log as logging

from thunder_agent.coordinator import manager as coordinator_manager
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import service_base

LOG = logging.getLogger(__name__)


class CoordinatorService(service_base.RPCService):
    name = 'thunder-coordinator'

    def make_manager(self):
        return coordinator_manager.CoordinatorManager.from_conf(self.conf)

    def make_server(self, transport):
        group = self.conf.coordinator
        LOG.info('thunder-coordinator %s listening on topic %s (policy %s, '
                 'fan-out %d, origin fan-out %d)', self.conf.host,
                 group.topic, group.policy, group.fan_out,
                 group.origin_fan_out)
        return coordinator_rpc.get_server(transport, self.manager,
                                          group.topic, self.conf.host)

    def periodic_jobs(self):
        # Children of a silent node are moved within a second or so of its
        # timeout rather than at the next unrelated call.
        return [service_base.PeriodicJob(
            'expiry', self.manager.expire,
            lambda: min(1.0, self.conf.coordinator.heartbeat_interval / 2.0))]
