"""Building blocks of the ``kernel`` driver.

iSCSI sessions (os-brick), device-mapper tables, loop devices, a local
read cache (bcache, or dm-cache for comparison) and tgt exports. Every
root operation goes through :mod:`thunder_agent.privileged.kernel` (block
devices) or :mod:`thunder_agent.privileged.tgt` (tgt, discovery), which
take ids and the agent's own devices and build commands and tables
themselves; these modules turn their (exit code, stdout, stderr) answers
into typed errors.
"""

from thunder_agent import exception


def check(result, what, ok_codes=(0,)):
    """Return stdout of a privileged command or raise BackendError."""
    code, out, err = result
    if code not in ok_codes:
        raise exception.BackendError(
            reason='%s failed (exit code %s): %s'
                   % (what, code, (err or out).strip()))
    return out
