"""Every operation of the project that needs root, through oslo.privsep.

The agent runs unprivileged; the entry points run in the privsep daemon
with only the capabilities listed in :data:`default`. They are the whole
privileged surface, so each one is small and checks its arguments before
it runs anything:

* :mod:`thunder_agent.privileged.kernel` -- the kernel driver's fixed
  binaries (dmsetup, tgtadm, losetup, make-bcache, iscsiadm discovery) and
  a few sysfs attributes;
* :mod:`thunder_agent.privileged.network` -- the relay rate limit (tc via
  pyroute2).
"""

from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context

default = priv_context.PrivContext(
    'thunder_agent',
    cfg_section='thunder_agent_privileged',
    pypath=__name__ + '.default',
    capabilities=[caps.CAP_SYS_ADMIN, caps.CAP_NET_ADMIN,
                  caps.CAP_DAC_OVERRIDE, caps.CAP_DAC_READ_SEARCH,
                  caps.CAP_SYS_PTRACE, caps.CAP_KILL, caps.CAP_CHOWN,
                  caps.CAP_FOWNER, caps.CAP_MKNOD],
)
