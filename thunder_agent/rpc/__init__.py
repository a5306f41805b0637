"""RPC between nova-compute (or tools) and the per-host thunder agents."""

import oslo_messaging as messaging

ALLOWED_EXMODS = ['thunder_agent.exception']


def get_transport(conf, url=None):
    """A transport whose clients re-raise the agent's typed errors.

    *conf* should be the process's global ``cfg.CONF``: oslo.messaging
    registers some of its option groups there only.
    """
    return messaging.get_rpc_transport(conf, url=url,
                                       allowed_remote_exmods=ALLOWED_EXMODS)
