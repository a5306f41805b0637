"""iSCSI exports with tgt: one target per template, CHAP on every target.

The backend drives a running tgtd on its management port; it does not
start tgtd itself (a system service, or one per network namespace in the
guest tests). The privileged helper (:mod:`thunder_agent.privileged.tgt`)
talks to tgtd over its management socket instead of running tgtadm, so
that a CHAP secret never sits on a command line, and touches only the
agent's own targets (names under ``[kernel] iqn_prefix``, LUNs backed by
its own template devices).
"""

from thunder_agent import exception
from thunder_agent.drivers.kernel import check
from thunder_agent.privileged import tgt as priv_tgt

LUN = priv_tgt.LUN
parse_targets = priv_tgt.parse_targets


class Tgt:
    def __init__(self, control_port, scope=None):
        self.control_port = control_port
        self.scope = scope

    def check_running(self):
        code, _out, err = priv_tgt.tgt_check(self.control_port)
        if code != 0:
            raise exception.BackendError(
                reason='tgtd is not reachable on control port %s: %s'
                       % (self.control_port, err.strip()))

    def targets(self):
        """The agent's own targets: ``{iqn: {'tid', 'sessions', 'luns':
        {lun: backing path}, 'accounts', 'acls'}}``."""
        code, targets, err = priv_tgt.tgt_targets(self.scope,
                                                  self.control_port)
        check((code, '', err), 'tgtadm show')
        return targets

    def find(self, iqn):
        return self.targets().get(iqn)

    def sessions(self, iqn):
        target = self.find(iqn)
        return target['sessions'] if target else 0

    def export(self, iqn, image_id, secret):
        """Export the template of *image_id* read-only as LUN 1 of *iqn*,
        CHAP-protected (account ``thunder-<image_id>``).

        Idempotent: an existing target of that name is re-used.
        """
        code, tid, err = priv_tgt.tgt_export(self.scope, self.control_port,
                                             image_id, iqn, secret)
        check((code, '', err), 'tgt export of %s' % iqn)
        return tid

    def unexport(self, iqn, image_id):
        """Remove the target and its account (refused while initiators
        are logged in)."""
        target = self.find(iqn)
        if target is not None and target['sessions']:
            raise exception.BackendError(
                reason='target %s still has %d session(s)'
                       % (iqn, target['sessions']))
        check(priv_tgt.tgt_unexport(self.scope, self.control_port, image_id,
                                    iqn), 'tgt unexport of %s' % iqn)
