"""device-mapper devices of the agent (created and queried by privsep).

The privileged helper builds every table itself from ids, sizes and the
agent's own devices (:mod:`thunder_agent.privileged.kernel`); this module
names the devices and turns the helper's answers into typed errors.
*scope* is the agent's (:func:`thunder_agent.privileged.scope.of`).
"""

import time

from thunder_agent import exception
from thunder_agent.drivers.kernel import check
from thunder_agent.privileged import kernel as priv

MAPPER_DIR = '/dev/mapper/'
UUID_PREFIX = priv.UUID_PREFIX
# dmsetup exit code when the device does not exist is 1 with this text.
_NO_DEVICE = ('No such device', 'does not exist')


def device_path(name):
    return MAPPER_DIR + name


def exists(scope, name):
    code, _out, err = priv.dm_info(scope, name)
    if code == 0:
        return True
    if any(text in err for text in _NO_DEVICE):
        return False
    raise exception.BackendError(reason='dmsetup info %s: %s'
                                 % (name, err.strip()))


def created(result, name):
    """The device path of *name* once the helper's create succeeded."""
    check(result, 'dmsetup create %s' % name)
    return device_path(name)


def remove(scope, name, timeout=30):
    """Remove *name*; absent is fine. udev may hold a just-created device
    open for a moment, hence the retries."""
    deadline = time.monotonic() + timeout
    while True:
        code, _out, err = priv.remove_dm_device(scope, name)
        if code == 0 or any(text in err for text in _NO_DEVICE):
            return
        if time.monotonic() >= deadline:
            raise exception.BackendError(
                reason='dmsetup remove %s: %s' % (name, err.strip()))
        time.sleep(0.5)


def status(scope, name):
    return check(priv.dm_status(scope, name),
                 'dmsetup status %s' % name).strip()


def open_count(scope, name):
    out = check(priv.dm_open_count(scope, name), 'dmsetup info %s' % name)
    return int(out.strip())
