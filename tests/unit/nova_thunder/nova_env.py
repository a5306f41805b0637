"""Load Nova's configuration and objects in the shared test process.

Nothing here imports ``nova.tests``: that would monkey-patch the whole test
process with eventlet. nova-thunder's own options are registered as
``nova-compute-thunder`` registers them (:func:`nova_thunder.wiring.apply`
does the same).
"""


def load():
    import nova.conf
    from nova import objects

    from nova_thunder import conf as thunder_conf

    thunder_conf.register_opts(nova.conf.CONF)
    objects.register_all()
    return nova.conf.CONF
