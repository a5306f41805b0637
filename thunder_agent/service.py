"""The agent as a long-running service: RPC server and periodic jobs.

One looping call per cadence, each with its own option:

* housekeeping ([agent] housekeeping_interval): data-plane supervision,
  finishing deletes, garbage collection, eviction, saving records;
* flush ([cache] flush_interval): cache metadata to disk;
* heartbeat ([coordinator] heartbeat_interval, jittered): one call for all
  the host's relaying templates, whose answer gives each its parent and
  children;
* parent probes ([relay] parent_probe_interval, jittered): one connection
  attempt per distinct parent.

None of them holds a host-wide lock; data-plane changes they decide on
(repairs, re-parents) run in the manager's background workers.
"""

from oslo_log import log as logging

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
        LOG.info('thunder-agent %s listening on topic %s (driver %s)',
                 self.conf.host, self.conf.agent.topic,
                 self.manager.driver.name)
        return server

    def periodic_jobs(self):
        conf = self.conf
        manager = self.manager
        jobs = [
            service_base.PeriodicJob(
                'housekeeping', manager.housekeeping,
                lambda: conf.agent.housekeeping_interval),
            service_base.PeriodicJob(
                'flush', manager.flush, lambda: conf.cache.flush_interval),
        ]
        if manager.relay is not None:
            jobs += [
                service_base.PeriodicJob(
                    'heartbeat', manager.heartbeat,
                    lambda: conf.coordinator.heartbeat_interval,
                    jitter=True),
                service_base.PeriodicJob(
                    'parent-probes', manager.probe_parents,
                    lambda: conf.relay.parent_probe_interval, jitter=True),
            ]
        return jobs

    def stop(self, graceful=False):
        super().stop(graceful)
        if self.manager is not None:
            self.manager.stop()
