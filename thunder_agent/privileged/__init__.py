"""Every operation of the project that needs root, through oslo.privsep.

The agent runs unprivileged; the entry points run in privsep daemons,
each with only the capabilities its operations need. They are the whole
privileged surface, so each entry point is semantic and narrow: it takes
ids, sizes and device names, checks them against the agent's own scope
(:mod:`thunder_agent.privileged.scope`) and builds every command line and
table itself:

* :data:`block` (:mod:`thunder_agent.privileged.kernel`): loop devices over
  files under ``[agent] state_path``, device-mapper devices named
  ``<[kernel] device_prefix>-...``, make-bcache and a few sysfs attributes
  of those devices. ``CAP_SYS_ADMIN`` for the loop, device-mapper and
  bcache ioctls and sysfs writes; ``CAP_DAC_OVERRIDE`` because the files
  it attaches are the agent's, mode 0600: a root process without it gets
  EACCES opening another user's 0600 file (checked with ``setpriv
  --bounding-set=-all,+sys_admin``: refused; ``+dac_override``: opened).
* :data:`iscsi` (:mod:`thunder_agent.privileged.tgt`): the agent's own tgt
  targets, spoken to tgtd over its management socket, and SendTargets
  discovery. The daemon keeps no capability at all: tgtd only checks that
  the peer's uid and gid are 0 and the management socket is root's
  (checked: a CapEff 0 root process adds an account). Its one tool,
  iscsiadm, runs with ``CAP_SYS_ADMIN`` only: measured in the guest, with
  none open-iscsi 2.1.8's discovery fails (exit 12, "iSCSI driver tcp is
  not loaded").
* :data:`net` (:mod:`thunder_agent.privileged.network`): the relay rate
  limit (tc over netlink): ``CAP_NET_ADMIN`` only.

No context keeps ``CAP_SYS_PTRACE``, ``CAP_KILL``, ``CAP_CHOWN``,
``CAP_FOWNER``, ``CAP_MKNOD`` or ``CAP_DAC_READ_SEARCH`` (the last is
covered by ``CAP_DAC_OVERRIDE``): nothing here traces or signals another
process, changes an owner or creates a device node (udev creates
``/dev/mapper`` nodes; on a host without udev add ``CAP_MKNOD`` in
``[thunder_agent_privileged] capabilities``). Kernel modules are loaded at
boot (modules-load.d): without ``CAP_SYS_MODULE`` the driver's modprobe
only confirms they are there.

oslo.privsep drops the daemon's own effective, permitted and inheritable
sets, but not its bounding set: a program a daemon runs as root would get
every capability back at execve (a uid-0 daemon with no capability is
not confined by that alone). So every tool (dmsetup, losetup,
make-bcache, modprobe, iscsiadm) runs under ``setpriv --bounding-set``
limited to its context's capabilities, or iscsiadm's own
(:func:`confined`).

Each context has its own configuration section (oslo.privsep registers
``user``, ``group``, ``capabilities``, ``helper_command`` ... in it):
``[thunder_agent_privileged]`` (block), ``[thunder_agent_privileged_iscsi]``
and ``[thunder_agent_privileged_network]``. A ``helper_command`` set only
in ``[thunder_agent_privileged]`` serves all three, so one setting (e.g.
``privsep-helper`` itself for an agent that runs as root) keeps working.
"""

import shlex

from oslo_config import cfg
from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context

SETPRIV = 'setpriv'

SECTION = 'thunder_agent_privileged'


class _Context(priv_context.PrivContext):
    """A context whose helper command defaults to the one in
    ``[thunder_agent_privileged]``."""

    def helper_command(self, sockpath):
        shared = cfg.CONF[SECTION].helper_command
        if self.cfg_section == SECTION or self.conf.helper_command \
                or not shared:
            return super().helper_command(sockpath)
        return shlex.split(shared) + [
            '--privsep_context', self.pypath, '--privsep_sock_path',
            sockpath]


block = _Context(
    'thunder_agent',
    cfg_section=SECTION,
    pypath=__name__ + '.block',
    capabilities=[caps.CAP_SYS_ADMIN, caps.CAP_DAC_OVERRIDE],
)
iscsi = _Context(
    'thunder_agent',
    cfg_section=SECTION + '_iscsi',
    pypath=__name__ + '.iscsi',
    capabilities=[],
)
net = _Context(
    'thunder_agent',
    cfg_section=SECTION + '_network',
    pypath=__name__ + '.net',
    capabilities=[caps.CAP_NET_ADMIN],
)
CONTEXTS = (block, iscsi, net)


def confined(context, argv, capabilities=None):
    """*argv* run with at most *capabilities* (default: *context*'s
    configured ``capabilities``): ``setpriv`` empties the inheritable set
    and drops every other capability from the bounding set before it
    executes the tool, so root's execve cannot give the tool more."""
    if capabilities is None:
        capabilities = context.conf.capabilities
    names = sorted(caps.CAPS_BYVALUE[c][len('CAP_'):].lower()
                   for c in capabilities)
    return [SETPRIV, '--inh-caps=-all',
            '--bounding-set=' + ','.join(['-all'] + ['+' + n for n in names]),
            '--'] + list(argv)
