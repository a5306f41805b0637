"""``thunder-coordinator``: assigns relay parents to the agents."""

import sys

from oslo_service import backend

backend.init_backend(backend.BackendType.THREADING)

from oslo_config import cfg  # noqa: E402
from oslo_log import log as logging  # noqa: E402
from oslo_service import service  # noqa: E402

from thunder_agent import conf as agent_conf  # noqa: E402
from thunder_agent.coordinator import policies  # noqa: E402
from thunder_agent.coordinator import service as coord_service  # noqa: E402
from thunder_agent import exception  # noqa: E402
from thunder_agent import identity  # noqa: E402

LOG = logging.getLogger(__name__)


def main(argv=None):
    conf = cfg.CONF
    agent_conf.register_opts(conf)
    logging.register_options(conf)
    conf(sys.argv[1:] if argv is None else argv, project='thunder-agent',
         prog='thunder-coordinator',
         default_config_files=cfg.find_config_files('nova-thunder',
                                                    'thunder-coordinator'))
    logging.setup(conf, 'thunder-coordinator')
    group = conf.coordinator
    # Fail here, once, rather than in a worker that would be restarted.
    try:
        policies.load(group.policy, group.fan_out, group.origin_fan_out)
    except exception.ThunderException as e:
        LOG.error('%s', e)
        return 1
    if conf.tls.enabled:
        try:
            identity.Verifier.from_file(coord_service.ca_file(conf))
        except (OSError, ValueError) as e:
            LOG.error('Cannot read the CA of signed calls ([coordinator] '
                      'ca_file): %s', e)
            return 1
    if group.node_timeout < 2 * group.heartbeat_interval:
        LOG.warning('[coordinator] node_timeout (%ss) is less than two '
                    'heartbeat intervals (%ss): nodes may be dropped while '
                    'alive', group.node_timeout, group.heartbeat_interval)
    # One process: the trees live in this process's memory.
    launcher = service.launch(
        conf, coord_service.CoordinatorService(conf),
        restart_method='mutate', no_fork=True)
    launcher.wait()


if __name__ == '__main__':
    sys.exit(main())
