"""RPC between nova-compute (or tools) and the per-host thunder agents."""

import oslo_messaging as messaging

ALLOWED_EXMODS = ['thunder_agent.exception']


def get_transport(conf, url=None):
    return messaging.get_rpc_transport(conf, url=url,
                                       allowed_remote_exmods=ALLOWED_EXMODS)
