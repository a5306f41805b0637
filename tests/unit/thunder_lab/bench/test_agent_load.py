"""The pure parts of thunder-bench-agent: figures, config files for both
option sets, the table, process lookups; the scenarios over a fake
agent."""

import os
import threading

import oslo_messaging as messaging
import pytest

from thunder_agent import conf as agent_conf
from thunder_lab.bench import agent_load
from thunder_lab.cmd import bench_agent

MIB = 1 << 20


def new_options():
    """{"group.name": default} of the tree under test (the re-cut one)."""
    known = {}
    for group, opts in agent_conf.list_opts():
        name = group if isinstance(group, str) else group.name
        for opt in opts:
            known['%s.%s' % (name, opt.dest)] = opt.default
    return known


# The option names of the previous release that the benchmark writes or
# reads (its thunder_agent/conf.py): no [relay] join_timeout, the join was
# bounded by [coordinator] rpc_timeout.
OLD_OPTIONS = {
    'DEFAULT.host': 'h', 'agent.state_path': '/var/lib/thunder-agent',
    'agent.run_path': '/run/thunder-agent', 'agent.backend': 'qemu',
    'agent.topic': 'thunder-agent', 'agent.housekeeping_interval': 10,
    'relay.enabled': False, 'relay.listen_address': '127.0.0.1',
    'relay.port_min': 10810, 'relay.port_max': 10873,
    'relay.parent_ready_timeout': 30.0, 'coordinator.topic':
    'thunder-coordinator', 'coordinator.rpc_timeout': 30,
}


def config(known, overrides=()):
    return agent_load.agent_config(
        known, 'bench-host', 'rabbit://guest:pw@127.0.0.1:5672/', '/tmp/w',
        'nobody', (20000, 20009), overrides)


# -- figures ---------------------------------------------------------------
def test_summarize_counts_every_call_and_its_errors():
    figures = agent_load.summarize([1.0, 2.0, 3.0, 4.0, 300.0],
                                   ['timeout'], 301.5)
    assert figures == {'calls': 5, 'errors': 1, 'p50_s': 3.0,
                       'p90_s': pytest.approx(181.6), 'max_s': 300.0,
                       'wall_s': 301.5}


def test_summarize_of_nothing():
    figures = agent_load.summarize([], [], 0.0)
    assert figures['calls'] == 0
    assert figures['p50_s'] is None and figures['max_s'] is None


def test_error_kind_names_timeouts():
    assert agent_load.error_kind(messaging.MessagingTimeout('x'), 300) == (
        'no answer within 300 s (timeout)')
    assert agent_load.error_kind(ValueError('bad\nsecond line'), 300) == (
        'ValueError: bad')


# -- options and config files ----------------------------------------------
def test_parse_agent_option():
    assert agent_load.parse_agent_option('relay.join_timeout=3') == (
        'relay', 'join_timeout', '3')
    assert agent_load.parse_agent_option('DEFAULT.debug = true') == (
        'DEFAULT', 'debug', 'true')
    for bad in ('relay.join_timeout', 'join_timeout=3', '.x=1', 'a.=1',
                'a.b.c=1', 'a.b=1\n[x]'):
        with pytest.raises(ValueError):
            agent_load.parse_agent_option(bad)


def test_new_tree_config_waits_join_timeout():
    known = new_options()
    groups = config(known)
    assert groups['relay']['enabled'] == 'true'
    assert groups['coordinator']['topic'] == 'nobody'
    assert groups['agent']['run_path'] == '/tmp/w/run'
    assert (groups['relay']['port_min'], groups['relay']['port_max']) == (
        '20000', '20009')
    assert agent_load.coordinator_wait(known, groups) == (
        'relay.join_timeout', float(known['relay.join_timeout']), None)
    groups = config(known, [('relay', 'join_timeout', '2')])
    assert agent_load.coordinator_wait(known, groups) == (
        'relay.join_timeout', 2.0, None)


def test_old_tree_config_waits_rpc_response_timeout():
    # Its join passed timeout=None to prepare(): oslo.messaging's own
    # [DEFAULT] rpc_response_timeout bounded it, not [coordinator]
    # rpc_timeout.
    def wait(*overrides):
        name, seconds, note = agent_load.coordinator_wait(
            OLD_OPTIONS, config(OLD_OPTIONS, overrides))
        assert 'prepare(timeout=None)' in note
        return name, seconds
    assert wait() == ('DEFAULT.rpc_response_timeout', 60.0)
    assert wait(('coordinator', 'rpc_timeout', '7')) == (
        'DEFAULT.rpc_response_timeout', 60.0)
    assert wait(('DEFAULT', 'rpc_response_timeout', '9')) == (
        'DEFAULT.rpc_response_timeout', 9.0)


def test_config_refuses_names_the_tree_lacks():
    with pytest.raises(agent_load.BenchError, match='join_timeout'):
        config(OLD_OPTIONS, [('relay', 'join_timeout', '3')])
    with pytest.raises(agent_load.BenchError, match='no_such'):
        config(new_options(), [('agent', 'no_such', '1')])
    # Library groups are passed through: the tree does not own them.
    groups = config(OLD_OPTIONS, [('oslo_messaging_rabbit',
                                   'heartbeat_timeout_threshold', '0')])
    assert groups['oslo_messaging_rabbit'] == {
        'heartbeat_timeout_threshold': '0'}


def test_config_of_each_tree_uses_only_its_names():
    for known in (new_options(), OLD_OPTIONS):
        groups = config(known)
        for group, values in groups.items():
            for name in values:
                if group in agent_load.THUNDER_GROUPS:
                    assert '%s.%s' % (group, name) in known


def test_render_config_is_an_ini_file_oslo_config_reads(tmp_path):
    from oslo_config import cfg
    known = new_options()
    text = agent_load.render_config(config(known, [('relay', 'join_timeout',
                                                    '2')]))
    path = tmp_path / 'agent.conf'
    path.write_text(text)
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([], default_config_files=[str(path)])
    assert conf.relay.enabled is True
    assert conf.relay.join_timeout == 2
    assert conf.relay.port_min == 20000
    assert conf.coordinator.topic == 'nobody'
    assert conf.agent.backend == 'qemu'
    assert conf.host == 'bench-host'


def test_coordinator_wait_needs_one_of_the_options():
    with pytest.raises(agent_load.BenchError):
        agent_load.coordinator_wait({'agent.topic': 'x'}, {})


def test_redact_url():
    assert agent_load.redact_url('rabbit://guest:secret@127.0.0.1:5/') == (
        'rabbit://guest:***@127.0.0.1:5/')
    assert agent_load.redact_url('rabbit://127.0.0.1:5/') == (
        'rabbit://127.0.0.1:5/')


# -- table -----------------------------------------------------------------
def result(alone=5.2, distinct_max=6.0, errors=0, wait=5.0):
    def scenario(calls, max_s, errors=0, **checks):
        return {'calls': calls, 'errors': errors, 'p50_s': max_s / 2,
                'p90_s': max_s * 0.9, 'max_s': max_s, 'wall_s': max_s,
                'checks': dict(checks, data_ok=True),
                'error_kinds': {'no answer within 300 s (timeout)': errors}
                if errors else {}, 'problems': [],
                'coordinator_down_before': None}
    r = {'agent': {'root': '/tmp/before', 'python': '/usr/bin/python3'},
         'image_mib': 64, 'timeout_s': 300,
         'coordinator_wait': {'option': 'relay.join_timeout',
                              'seconds': wait, 'topic': 'nobody'},
         'scenarios': {
             'alone': scenario(1, alone, templates=1, snapshots=1,
                               daemons=1),
             'distinct': scenario(50, distinct_max, errors, templates=50,
                                  snapshots=50, daemons=50),
             'shared': scenario(50, 1.0, templates=1, snapshots=50,
                                daemons=1)}}
    r['bound'] = agent_load.bound(r)
    return r


def test_bound_met_and_missed():
    assert agent_load.bound(result())['ok'] is True
    assert agent_load.bound(result())['limit_s'] == pytest.approx(10.2)
    assert agent_load.bound(result(distinct_max=150.0))['ok'] is False
    # A call that failed fast is no success either.
    assert agent_load.bound(result(errors=1))['ok'] is False
    r = result()
    del r['scenarios']['alone']
    assert agent_load.bound(r) is None
    # alone after distinct: no coordinator wait left in it to compare.
    r = result()
    r['scenarios']['alone'] = r['scenarios'].pop('alone')
    r['bound'] = agent_load.bound(r)
    assert r['bound'] is None
    assert 'bound: not checked, alone ran after distinct' in (
        agent_load.format_table(r))


def test_format_table():
    text = agent_load.format_table(result(distinct_max=150.0, errors=3))
    lines = text.splitlines()
    assert 'agent tree /tmp/before' in lines[0]
    assert '[relay] join_timeout = 5 s' in text
    r = result()
    r['coordinator_wait']['note'] = 'a note'
    assert '  (a note)' in agent_load.format_table(r).splitlines()
    rows = {line.split()[0]: line.split() for line in lines
            if line.split() and line.split()[0] in agent_load.SCENARIOS}
    assert rows['distinct'][1:7] == ['50', '3', '75.00', '135.00',
                                     '150.00', '150.00']
    assert '1 template(s), 50 snapshot(s), 1 daemon(s), data ok' in text
    assert 'bound: max(distinct) 150.00 s > alone 5.20 s' in text
    assert 'NOT met' in text
    assert 'distinct: 3 x no answer within 300 s (timeout)' in text
    assert 'orphans' not in text
    r = result(errors=1)
    r['scenarios']['distinct']['orphans'] = 1
    assert 'distinct: the agent still made 1 snapshot(s) for calls that ' \
        'had failed' in agent_load.format_table(r)


def test_format_table_without_figures():
    r = result()
    r['scenarios']['alone'].update(calls=0, p50_s=None, p90_s=None,
                                   max_s=None)
    r['bound'] = None
    row = [line for line in agent_load.format_table(r).splitlines()
           if line.startswith('alone')][0]
    assert row.split()[3:6] == ['-', '-', '-']


# -- processes -------------------------------------------------------------
def fake_proc(tmp_path, processes):
    """A /proc with {pid: (argv, environ)}."""
    root = tmp_path / 'proc'
    for pid, (argv, env) in processes.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / 'cmdline').write_bytes(b'\0'.join(a.encode() for a in argv)
                                    + b'\0')
        (d / 'environ').write_bytes(b'\0'.join(e.encode() for e in env))
    (root / 'self').mkdir()
    return str(root)


def test_storage_daemons_and_processes_under(tmp_path):
    run = '/tmp/tba-x/agent/run'
    a, b = 'aaaaaaaa-0000-4000-8000-000000000001', (
        'aaaaaaaa-0000-4000-8000-000000000002')
    proc = fake_proc(tmp_path, {
        10: (['/usr/bin/qemu-storage-daemon', '--chardev',
              'socket,id=qmp,path=%s/%s.qmp,server=on' % (run, a)], []),
        11: (['qemu-storage-daemon', '--chardev',
              'socket,id=qmp,path=%s/%s.qmp,server=on' % (run, b)], []),
        # Another agent's daemon of the same image.
        12: (['qemu-storage-daemon', '--chardev',
              'socket,id=qmp,path=/other/run/%s.qmp' % a], []),
        13: (['socat', 'UNIX-LISTEN:%s/%s.up,fork' % (run, a),
              'UNIX-CONNECT:/tmp/tba-x/origin.sock'], []),
        14: (['vim', '%s.qmp' % a], []),
    })
    assert agent_load.storage_daemons(run, a, proc) == [10]
    assert agent_load.storage_daemons(run, b, proc) == [11]
    assert agent_load.processes_under(run, proc) == [10, 11, 13]


def test_private_epmd_matches_port_and_node(tmp_path):
    env1 = ['ERL_EPMD_PORT=4001', 'RABBITMQ_NODENAME=thunder5001@localhost']
    env2 = ['ERL_EPMD_PORT=4002', 'RABBITMQ_NODENAME=thunder5002@localhost']
    proc = fake_proc(tmp_path, {
        20: (['/usr/lib/erlang/bin/epmd', '-daemon'], env1),
        21: (['/usr/lib/erlang/bin/epmd', '-daemon'], env2),
        22: (['sh', '-c', 'epmd'], env1),
    })
    assert agent_load.private_epmd(4001, 'thunder5001@localhost', proc) == [20]
    assert agent_load.private_epmd(4001, 'thunder5002@localhost', proc) == []


def test_free_port_range_is_free():
    import socket
    first, last = agent_load.free_port_range(4)
    assert last - first == 3
    with socket.socket() as s:
        s.bind(('127.0.0.1', first))


# -- scenarios over a fake agent ---------------------------------------------
class FakeClient:
    """AgentAPI lookalike: prepares build one template per image, like the
    agent; instance ids in *fail* time out."""

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.templates = {}
        self.lock = threading.Lock()
        self.status_calls = 0

    def prepare(self, host, image_id, origin, size, image_format,
                instance_id):
        assert origin['data']['export'] == image_id
        if instance_id in self.fail:
            raise messaging.MessagingTimeout('no reply')
        with self.lock:
            self.templates.setdefault(image_id, []).append(instance_id)
        return {'driver_volume_type': 'thunder',
                'data': {'instance_id': instance_id}}

    def get_status(self, host, timeout=None):
        self.status_calls += 1
        return {'templates': [{'image_id': i, 'snapshots': sorted(s)}
                              for i, s in self.templates.items()],
                'relay': {'coordinator_down': self.status_calls > 1}}


class FakeAgent:
    host = 'bench-host'
    run_path = '/nonexistent/run'


class FakeOrigin:
    def connection(self, image_id):
        return {'driver_volume_type': 'nbd',
                'data': {'socket': '/x/origin.sock', 'export': image_id}}


@pytest.fixture
def bench(monkeypatch):
    said = []
    b = agent_load.Bench(images=4, image_mib=16, verify=False,
                         say=said.append)
    b.said = said
    b.client = FakeClient()
    b.agent = FakeAgent()
    b.origin = FakeOrigin()
    b.ids = b._image_ids()
    # One daemon per image that has a template, as the agent runs them.
    monkeypatch.setattr(agent_load, 'storage_daemons',
                        lambda run, image_id: [1] if image_id in
                        b.client.templates else [])
    return b


def test_shared_scenario_checks_one_template(bench):
    figures = bench.run_scenario('shared')
    assert figures['calls'] == 4 and figures['errors'] == 0
    assert figures['checks'] == {'templates': 1, 'snapshots': 4,
                                 'daemons': 1, 'data_ok': None}
    assert figures['problems'] == []
    assert len(figures['latencies_s']) == 4
    assert figures['coordinator_down_before'] is False
    assert bench.said[0] == 'shared: 4 call(s) started'
    assert bench.said[-1].startswith('shared: 4/4 done, 0 error(s)')


def test_distinct_scenario_counts_timeouts(bench):
    doomed = set()
    real = bench._prepare

    def prepare(image_id, instance_id):
        if image_id == bench.ids['distinct'][0]:
            doomed.add(instance_id)
            bench.client.fail.add(instance_id)
        return real(image_id, instance_id)
    bench._prepare = prepare
    figures = bench.run_scenario('distinct')
    assert figures['calls'] == 4 and figures['errors'] == 1
    assert figures['error_kinds'] == {
        'no answer within 300 s (timeout)': 1}
    assert figures['checks']['templates'] == 3
    assert figures['checks']['daemons'] == 3
    assert figures['problems'] == []


def test_orphans_are_snapshots_of_failed_calls(bench):
    bench.client.fail.add('late')
    result = {'scenarios': {'alone': {'failed_instances': ['late']},
                            'shared': {'failed_instances': []}}}
    bench.count_orphans(result)
    assert result['scenarios']['alone']['orphans'] == 0
    # The agent finished the call after the client had given up.
    bench.client.templates['some-image'] = ['late']
    bench.count_orphans(result)
    assert result['scenarios']['alone']['orphans'] == 1
    assert result['scenarios']['shared']['orphans'] == 0


def test_check_reports_missing_snapshots(bench, monkeypatch):
    monkeypatch.setattr(agent_load, 'storage_daemons',
                        lambda run, image_id: [1, 2])
    bench.client.templates[bench.ids['shared'][0]] = ['someone-else']
    figures = bench.run_scenario('shared')
    assert any('has 5 snapshot(s), 4 prepare(s) succeeded' in p
               for p in figures['problems'])
    assert any('2 qemu-storage-daemon processes' in p
               for p in figures['problems'])


def test_bench_refuses_bad_arguments():
    with pytest.raises(agent_load.BenchError):
        agent_load.Bench(images=0)
    with pytest.raises(agent_load.BenchError):
        agent_load.Bench(scenarios=['alone', 'storm'])


# -- command line ----------------------------------------------------------
def test_cli_parses_options():
    args = bench_agent._parser().parse_args([
        '--images', '5', '--scenarios', 'shared,alone', '--agent-option',
        'relay.join_timeout=3', '--agent-option', 'DEFAULT.debug=true',
        '--timeout', '60'])
    assert args.images == 5
    assert args.scenarios == ['shared', 'alone']
    assert args.agent_option == [('relay', 'join_timeout', '3'),
                                 ('DEFAULT', 'debug', 'true')]
    assert args.timeout == 60.0


@pytest.mark.parametrize('argv', [
    ['--images', '0'], ['--scenarios', 'alone,alone'],
    ['--scenarios', 'boot'], ['--agent-option', 'join_timeout=3'],
    ['--timeout', '-1']])
def test_cli_refuses(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_agent._parser().parse_args(argv)
    assert e.value.code == 2


def test_cli_refuses_a_tree_without_the_agent(tmp_path, capsys):
    assert bench_agent.main(['--agent-root', str(tmp_path)]) == 2
    assert 'no thunder_agent package' in capsys.readouterr().err
    assert not os.listdir(tmp_path)
