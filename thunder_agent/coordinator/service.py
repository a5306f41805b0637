"""The coordinator as a long-running service: RPC server plus expiry."""

import os

from oslo_log import log as logging

from thunder_agent.coordinator import manager as coordinator_manager
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import identity
from thunder_agent import service_base

LOG = logging.getLogger(__name__)

# Casts of tree_changed per (node, image) at most every this many seconds.
NOTIFY_INTERVAL = 0.2


def ca_file(conf):
    """The CA file signed calls are checked against."""
    return conf.coordinator.ca_file or os.path.join(
        conf.tls.certificates_dir, 'ca-cert.pem')


def make_verifier(conf):
    """The coordinator's :class:`identity.Verifier`; None, loudly, with
    ``[tls] enabled = False``."""
    if not conf.tls.enabled:
        LOG.warning('[tls] enabled is False: the coordinator believes '
                    'every caller. Any RabbitMQ client can join, re-parent '
                    'or evict nodes of every tree. Use it in a lab only.')
        return None
    path = ca_file(conf)
    verifier = identity.Verifier.from_file(
        path, skew=conf.coordinator.signature_skew)
    LOG.info('Signed calls are checked against the CA in %s (skew %d s)',
             path, conf.coordinator.signature_skew)
    return verifier


class CoordinatorService(service_base.RPCService):
    name = 'thunder-coordinator'

    def __init__(self, conf):
        super().__init__(conf)
        self.notifier = None

    def make_manager(self):
        return coordinator_manager.CoordinatorManager.from_conf(self.conf)

    def make_server(self, transport):
        group = self.conf.coordinator
        verifier = make_verifier(self.conf)
        self.notifier = coordinator_rpc.AgentNotifier(
            transport, self.conf.agent.topic, NOTIFY_INTERVAL)
        self.manager.notify = self.notifier
        LOG.info('thunder-coordinator %s listening on topic %s (policy %s, '
                 'fan-out %d, origin fan-out %d)', self.conf.host,
                 group.topic, group.policy, group.fan_out,
                 group.origin_fan_out)
        return coordinator_rpc.get_server(transport, self.manager,
                                          group.topic, self.conf.host,
                                          verifier)

    def periodic_jobs(self):
        # Children of a silent node are moved within a second or so of its
        # timeout rather than at the next unrelated call.
        return [service_base.PeriodicJob(
            'expiry', self.manager.expire,
            lambda: min(1.0, self.conf.coordinator.heartbeat_interval / 2.0)),
            # Changes held back by the notifier's interval go out soon
            # after it.
            service_base.PeriodicJob('notify', self.notifier.flush,
                                     lambda: NOTIFY_INTERVAL)]
