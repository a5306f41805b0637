"""AgentProcess: the options it writes for the agent it runs."""

import configparser
import shlex

from thunder_lab.emulation import agent as agent_mod


def _conf(process):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(process.conf_file)
    return parser


def test_privsep_helper_runs_directly_with_the_agents_config(tmp_path):
    helper = str(tmp_path / 'a venv' / 'bin' / 'privsep-helper')
    process = agent_mod.AgentProcess(
        'rabbit://guest:guest@192.0.2.1:5672/', str(tmp_path / 'work'),
        host='agent-a', backend='kernel', log_dir=str(tmp_path / 'logs'),
        privsep_helper=helper,
        options={'kernel': {'device_prefix': 'ra'}})
    conf = _conf(process)
    for section in ('thunder_agent_privileged', 'privsep_osbrick'):
        # oslo.privsep appends --privsep_context and --privsep_sock_path.
        assert shlex.split(conf[section]['helper_command']) == [
            helper, '--config-file', process.conf_file]
    assert process.conf_file == str(tmp_path / 'logs' / 'thunder-agent.conf')
    assert conf['DEFAULT']['log_file'] == process.log_file
    assert conf['agent']['backend'] == 'kernel'
    assert conf['agent']['state_path'] == str(tmp_path / 'work' / 'state')
    assert conf['kernel']['device_prefix'] == 'ra'


def test_without_a_helper_privsep_keeps_its_default(tmp_path):
    process = agent_mod.AgentProcess('rabbit://guest:guest@192.0.2.1:5672/',
                                     str(tmp_path))
    conf = _conf(process)
    assert not conf.has_section('thunder_agent_privileged')
    assert not conf.has_section('privsep_osbrick')
