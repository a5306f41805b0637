"""The privileged helpers for real (guest): their capabilities, a relay
export whose CHAP secret is on no command line, refusals by the kernel's
own answers.

The in-process agents' helpers are forked from this process (see the
``guest`` fixture), so they are its children.
"""

import os
import threading

import pytest

from thunder_agent import exception
from thunder_agent.drivers.kernel import chap
from thunder_agent.privileged import kernel as priv
from thunder_agent.privileged import scope as pscope
from tests.guest.conftest import IN_PROCESS_PREFIX
from tests.guest.conftest import MIB
from tests.guest.conftest import read_device
from tests.guest.conftest import record
from tests.guest.conftest import RELAY_KEY
from tests.guest.conftest import sh

pytestmark = [pytest.mark.guest]

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
BLOCK = (1 << CAP_SYS_ADMIN) | (1 << CAP_DAC_OVERRIDE)
OS_BRICK = (1 << CAP_SYS_ADMIN) | (1 << CAP_DAC_READ_SEARCH)


def _status(pid):
    fields = {}
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            key, _, value = line.partition(':')
            fields[key] = value.strip()
    return fields


def _forked_helpers():
    """CapEff of this process's children that run this program (the
    privsep daemons forked by the guest fixture)."""
    me = os.getpid()
    with open('/proc/self/cmdline', 'rb') as f:
        cmdline = f.read()
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            status = _status(int(name))
            with open('/proc/%s/cmdline' % name, 'rb') as f:
                same = f.read() == cmdline
        except OSError:
            continue
        if same and int(status['PPid']) == me:
            found.append(int(status['CapEff'], 16))
    return found


def test_helpers_run_with_the_fewest_capabilities(guest):
    found = set(_forked_helpers())
    # block, iscsi, network; os-brick's own contexts keep CAP_SYS_ADMIN
    # and CAP_DAC_READ_SEARCH.
    shown = ['%x' % c for c in found]
    assert {BLOCK, 0, 1 << CAP_NET_ADMIN} <= found, shown
    assert found <= {BLOCK, 0, 1 << CAP_NET_ADMIN, OS_BRICK}, shown


class ArgvWatch:
    """Samples every process's command line while it runs."""

    def __init__(self, needle):
        self.needle = needle.encode()
        self.seen = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name in os.listdir('/proc'):
                if not name.isdigit():
                    continue
                try:
                    with open('/proc/%s/cmdline' % name, 'rb') as f:
                        argv = f.read()
                except OSError:
                    continue
                if self.needle in argv:
                    self.seen.append(argv)
            self.samples += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_a_relay_export_puts_its_secret_on_no_command_line(
        agents, make_image, guest):
    """A's export sets the account over tgtd's socket: no process ever
    shows the secret. B's login through os-brick still passes it to
    ``iscsiadm --op update -n node.session.auth.password -v`` (os-brick
    7.1.1; see doc/operators.rst): recorded, not held against the agent."""
    image = make_image(4 * MIB)
    a = agents('a')
    b = agents('b')
    iqn = a.driver.relay_address(image.image_id, []).export
    secret = chap.relay_secret(RELAY_KEY, iqn)
    with ArgvWatch(secret) as export_watch:
        ta = a.create_template(image, relay=True)
    try:
        assert export_watch.samples > 10
        assert export_watch.seen == []
        accounts = sh('tgtadm', '-C', str(guest['a'].control_port),
                      '--lld', 'iscsi', '--op', 'show', '--mode',
                      'account')
        assert 'thunder-' + image.image_id in accounts
        assert secret not in accounts
        # B logs in to A's export with the secret derived on its side:
        # the export's account really holds it.
        with ArgvWatch(secret) as login_watch:
            tb = b.create_template(image, sources=[b.parent_source(a, ta)])
        try:
            record('os_brick_login_secret_on_argv', {
                'samples': login_watch.samples,
                'sightings': len(login_watch.seen),
                'argv': sorted({argv.replace(secret.encode(), b'***')
                                .replace(b'\0', b' ').decode().strip()
                                for argv in login_watch.seen})})
            assert read_device(tb.export.local['device_path'],
                               image.size) == image.sha256
        finally:
            b.delete_template(tb)
    finally:
        a.delete_template(ta)


def test_the_helper_refuses_what_is_not_the_agents(agents, guest,
                                                   tmp_path):
    a = agents('a')
    scope = pscope.of(a.conf)
    outside = tmp_path / 'outside.img'
    outside.write_bytes(b'\0' * MIB)
    link = os.path.join(a.conf.agent.state_path, 'link.img')
    os.makedirs(a.conf.agent.state_path, exist_ok=True)
    os.symlink(str(outside), link)
    before = sh('losetup', '--list', '--noheadings', '--output', 'NAME')
    for path in (str(outside), link, '/etc/shadow'):
        with pytest.raises(exception.PrivilegedOperationNotAllowed):
            priv.attach_loop(scope, path)
    # A wider scope than the helper's configuration allows.
    for wider in (dict(scope, state_path='/'),
                  dict(scope, state_path=str(tmp_path)),
                  dict(scope, device_prefix='x' + IN_PROCESS_PREFIX)):
        with pytest.raises(exception.PrivilegedOperationNotAllowed):
            priv.dm_info(wider, '%s-snap-%s' % (
                wider['device_prefix'],
                '00000000-0000-4000-8000-000000000000'))
    with pytest.raises(exception.PrivilegedOperationNotAllowed):
        priv.detach_loop(scope, '/dev/loop0')
    assert sh('losetup', '--list', '--noheadings', '--output',
              'NAME') == before
    os.unlink(link)
