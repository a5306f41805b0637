"""Data-plane drivers, loaded by name from the ``thunder_agent.drivers``
entry point namespace."""

from stevedore import driver
from stevedore import exception as stevedore_exc

from thunder_agent import exception

NAMESPACE = 'thunder_agent.drivers'


def load(name, conf):
    try:
        mgr = driver.DriverManager(NAMESPACE, name, invoke_on_load=True,
                                   invoke_args=(conf,))
    except stevedore_exc.NoMatches:
        from stevedore import extension
        available = sorted(extension.ExtensionManager(NAMESPACE).names())
        raise exception.BackendNotFound(name=name, available=available)
    return mgr.driver
