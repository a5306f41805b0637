"""The relay export's daemon arguments and QMP calls, with a fake daemon."""

import json

import pytest

from thunder_agent.drivers.qemu import relay_export
from thunder_agent import exception

IMAGE = '3a1f6d0e-8c2b-4b5e-a7a4-6a0f5e9b2c11'


class FakeDaemon:
    def __init__(self):
        self.running = False
        self.started = None
        self.calls = []

    def is_running(self):
        return self.running

    def start(self, **kwargs):
        self.running = True
        self.started = kwargs

    def commands(self, *calls):
        self.calls.extend(calls)
        return [{} for _ in calls]

    def stop(self):
        self.running = False


@pytest.fixture
def export(tmp_path):
    made = relay_export.RelayExport(IMAGE, str(tmp_path), '/etc/pki')
    made.daemon = FakeDaemon()
    return made


def test_start_serves_the_template_socket_over_tls_to_the_children(
        export, tmp_path):
    export.start(['node-b', 'node-a'], max_connections=12,
                 reconnect_delay=300, open_timeout=10)
    started = export.daemon.started
    assert started['nbd_server'] == {'type': 'unix',
                                     'path': str(tmp_path / (IMAGE + '.tls'))}
    creds, authz = started['objects']
    assert creds == {'qom-type': 'tls-creds-x509', 'id': 'tls-server',
                     'endpoint': 'server', 'dir': '/etc/pki',
                     'verify-peer': True}
    assert authz['policy'] == 'deny'
    assert [r['match'] for r in authz['rules']] == ['CN=node-a',
                                                    'CN=node-b']
    assert {r['format'] for r in authz['rules']} == {'exact'}
    assert started['server_options'] == {'tls-creds': 'tls-server',
                                         'tls-authz': 'tls-authz'}
    assert started['max_connections'] == 12
    args = started['extra_args']
    source = json.loads(args[args.index('--blockdev') + 1])
    assert source == {'driver': 'nbd', 'node-name': 'template',
                      'server': {'type': 'unix', 'path': str(
                          tmp_path / (IMAGE + '.nbd'))},
                      'export': IMAGE, 'read-only': True,
                      'reconnect-delay': 300, 'open-timeout': 10}
    exported = json.loads(args[args.index('--export') + 1])
    assert exported['name'] == IMAGE and exported['writable'] is False


def test_a_running_export_is_kept_and_given_the_list(export):
    export.daemon.running = True
    export.start(['node-c'], 12, 300, 10)
    assert export.daemon.started is None
    (delete, add) = export.daemon.calls
    assert delete == ('object-del', {'id': 'tls-authz'})
    assert add[0] == 'object-add'
    assert [r['match'] for r in add[1]['rules']] == ['CN=node-c']


@pytest.mark.parametrize('bad', ['*', 'node-a,CN=x', '', 'a' * 300])
def test_a_bad_node_id_reaches_no_daemon(export, bad):
    with pytest.raises(exception.InvalidNodeId):
        export.start(['node-a', bad], 12, 300, 10)
    export.daemon.running = True
    with pytest.raises(exception.InvalidNodeId):
        export.set_children([bad])
    assert export.daemon.started is None and export.daemon.calls == []


def test_a_run_path_too_long_for_the_socket_is_refused(tmp_path):
    with pytest.raises(exception.BackendError, match='too long'):
        relay_export.RelayExport(IMAGE, '/tmp/' + 'x' * 80, '/etc/pki')
