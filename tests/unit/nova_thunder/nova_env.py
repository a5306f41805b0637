"""Load Nova's configuration and objects in the shared test process.

nova-compute imports Nova before the agent's RPC client, and the agent's
options then leave ``[DEFAULT] host`` to Nova. A test process may have
imported the agent first (its own tests run earlier); Nova's registration
of ``host`` would then clash, so the agent's copy — same meaning — is
handed over to Nova's before Nova is imported. Nothing here imports
``nova.tests``: that would monkey-patch the whole test process with eventlet.
"""

from oslo_config import cfg


def load():
    if 'nova.conf' not in __import__('sys').modules:
        try:
            from thunder_agent import conf as agent_conf
        except ImportError:
            agent_conf = None
        if agent_conf is not None:
            registered = cfg.CONF._opts.get('host', {}).get('opt')
            if any(registered is opt for opt in agent_conf.default_opts):
                cfg.CONF.unregister_opt(registered)
    import nova.conf
    from nova import objects

    import nova_thunder.conf  # noqa: F401 (registers [thunder])
    objects.register_all()
    return nova.conf.CONF
