"""Three privsep contexts, each with the fewest capabilities, its own
configuration section and the shared helper command."""

from oslo_config import cfg
from oslo_privsep import capabilities as caps
import pytest

from thunder_agent import exception
from thunder_agent import privileged
from thunder_agent.privileged import network


def test_each_context_keeps_only_what_it_needs():
    assert privileged.CONTEXTS == (privileged.block, privileged.iscsi,
                                   privileged.net)
    wanted = {
        privileged.block: ('thunder_agent_privileged',
                           {caps.CAP_SYS_ADMIN, caps.CAP_DAC_OVERRIDE}),
        privileged.iscsi: ('thunder_agent_privileged_iscsi', set()),
        privileged.net: ('thunder_agent_privileged_network',
                         {caps.CAP_NET_ADMIN}),
    }
    never = {caps.CAP_SYS_PTRACE, caps.CAP_KILL, caps.CAP_CHOWN,
             caps.CAP_MKNOD, caps.CAP_FOWNER, caps.CAP_SYS_MODULE,
             caps.CAP_DAC_READ_SEARCH, caps.CAP_SETUID}
    for context, (section, capabilities) in wanted.items():
        assert context.cfg_section == section
        assert set(context.conf.capabilities) == capabilities
        assert not set(context.conf.capabilities) & never
    assert len({c.pypath for c in privileged.CONTEXTS}) == 3


def test_network_entry_points_run_in_the_network_context():
    for func in (network.set_relay_rate_limit,
                 network.clear_relay_rate_limit):
        assert privileged.net.is_entrypoint(func)


@pytest.fixture
def helper_commands():
    yield
    for context in privileged.CONTEXTS:
        cfg.CONF.clear_override('helper_command', group=context.cfg_section)


def test_the_helper_command_is_shared_unless_a_context_has_its_own(
        helper_commands):
    for context in privileged.CONTEXTS:
        command = context.helper_command('/run/x.sock')
        assert command[:2] == ['sudo', 'privsep-helper']
        assert command[-4:] == ['--privsep_context', context.pypath,
                                '--privsep_sock_path', '/run/x.sock']
    cfg.CONF.set_override('helper_command', "'/opt/a venv/privsep-helper' "
                          '--config-file /etc/thunder/agent.conf',
                          group='thunder_agent_privileged')
    for context in privileged.CONTEXTS:
        assert context.helper_command('/run/x.sock') == [
            '/opt/a venv/privsep-helper', '--config-file',
            '/etc/thunder/agent.conf', '--privsep_context', context.pypath,
            '--privsep_sock_path', '/run/x.sock']
    cfg.CONF.set_override('helper_command', 'own-helper',
                          group='thunder_agent_privileged_network')
    assert privileged.net.helper_command('/s')[0] == 'own-helper'
    assert privileged.iscsi.helper_command('/s')[0] == \
        '/opt/a venv/privsep-helper'


@pytest.fixture
def in_process():
    privileged.net.set_client_mode(False)
    yield
    privileged.net.set_client_mode(True)


@pytest.mark.parametrize('args', [
    ('-eth0', 1000, [10809]), ('eth0 root', 1000, [10809]),
    ('eth0\n', 1000, [10809]), ('averyveryverylongname', 1000, [10809]),
    ('eth0', 0, [10809]), ('eth0', 2 ** 32, [10809]), ('eth0', '1', [1]),
    ('eth0', 1000, []), ('eth0', 1000, [0]), ('eth0', 1000, [70000]),
    ('eth0', 1000, list(range(1, 100))), ('eth0', 1000, '10809'),
])
def test_rate_limits_are_checked_in_the_helper(in_process, monkeypatch,
                                               args):
    monkeypatch.setattr(network, 'IPRoute', None)
    with pytest.raises(exception.PrivilegedOperationNotAllowed):
        network.set_relay_rate_limit(*args)
    with pytest.raises(exception.PrivilegedOperationNotAllowed):
        network.clear_relay_rate_limit('-a')
