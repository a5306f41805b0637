"""Tree policies: stevedore plugins deciding where nodes hang in a tree."""

import stevedore

from thunder_agent import exception

NAMESPACE = 'thunder_agent.tree_policies'


def load(name, fan_out, origin_fan_out=None):
    """Instantiate the policy registered as *name*."""
    try:
        manager = stevedore.DriverManager(
            NAMESPACE, name, invoke_on_load=True,
            invoke_kwds={'fan_out': fan_out,
                         'origin_fan_out': origin_fan_out})
    except stevedore.exception.NoMatches:
        available = sorted(stevedore.ExtensionManager(NAMESPACE).names())
        raise exception.TreePolicyNotFound(name=name,
                                           available=', '.join(available))
    return manager.driver
