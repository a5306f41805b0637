"""``thunder-agent``: the per-compute-host thunder daemon."""

import sys

from oslo_service import backend

backend.init_backend(backend.BackendType.THREADING)

from oslo_config import cfg  # noqa: E402
from oslo_log import log as logging  # noqa: E402
from oslo_service import service  # noqa: E402

from thunder_agent import conf as agent_conf  # noqa: E402
from thunder_agent import service as agent_service  # noqa: E402


def main(argv=None):
    conf = cfg.CONF
    agent_conf.register_opts(conf)
    logging.register_options(conf)
    conf(sys.argv[1:] if argv is None else argv, project='thunder-agent',
         default_config_files=cfg.find_config_files('nova-thunder',
                                                    'thunder-agent'))
    logging.setup(conf, 'thunder-agent')
    # One process: the agent owns on-disk state and data-plane daemons, so
    # it must not run in forked workers that outlive a killed parent.
    launcher = service.launch(conf, agent_service.AgentService(conf),
                              restart_method='mutate', no_fork=True)
    launcher.wait()


if __name__ == '__main__':
    sys.exit(main())
