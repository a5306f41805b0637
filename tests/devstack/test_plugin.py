"""devstack/plugin.sh: shellcheck, and what each phase does.

The plugin is sourced by bash exactly as devstack sources it (settings
first, then ``plugin.sh <mode> <phase>``), with devstack's functions
replaced by stubs that record their calls.
"""

import configparser
import hashlib
import hmac
import os
import re
import shlex
import shutil
import socket
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEVSTACK = os.path.join(ROOT, 'devstack')
SEP = '\x1f'

HARNESS = r'''
# errexit as stack.sh runs, and pipefail: the plugin must pass both.
set -o errexit -o pipefail
LOG=$1; shift
function _log {
    local a
    for a in "$@"; do printf '%s\x1f' "$a"; done >> "$LOG"
    echo >> "$LOG"
}
function setup_develop { _log setup_develop "$@"; }
function iniset { _log iniset "$@"; }
function inidelete { _log inidelete "$@"; }
function run_process { _log run_process "$@"; }
function stop_process { _log stop_process "$@"; }
function echo_summary { _log echo_summary "$@"; }
function sudo {
    # rabbitmqctl: its password arrives on standard input; the listings
    # come from the test.
    if [[ "$1" == rabbitmqctl ]]; then
        case "$2 $3" in
            "add_user "*|"change_password "*)
                _log sudo "$@" "stdin=$(cat)"; return;;
            "-q list_users") printf '%b' "$RABBIT_USERS_LIST";;
            "-q list_vhosts") printf '%b' "$RABBIT_VHOSTS_LIST";;
        esac
    fi
    _log sudo "$@"
}
function touch { _log touch "$@"; }
function chmod { _log chmod "$@"; }
function die { shift; echo "$*" >&2; exit 1; }
function qemu-img { _log qemu-img "$@"; }
function mktemp { echo /nonexistent/thunder-tmp; }
function get_transport_url { echo rabbit://stackrabbit:secret@10.0.0.5:5672/; }
function get_python_exec_prefix { echo /usr/local/bin; }
function trueorfalse {
    local value=${!2:-$1}
    if [[ "$value" =~ ^(True|true|1|yes)$ ]]; then
        echo True
    else
        echo False
    fi
}
function enable_service {
    local s; for s in "$@"; do ENABLED_SERVICES+=",$s"; done
    _log enable_service "$@"
}
function is_service_enabled {
    local s
    for s in "$@"; do
        [[ ",$ENABLED_SERVICES," == *",$s,"* ]] && return 0
    done
    return 1
}
function openstack {
    _log openstack "$@"
    case "$*" in
        *"volume type show"*) return "$TYPE_EXISTS";;
        *"image show"*) return "$IMAGE_EXISTS";;
    esac
}
RABBIT_PASSWORD=${RABBIT_PASSWORD-secret}
DEST=/opt/stack
DATA_DIR=/opt/stack/data
NOVA_CPU_CONF=/etc/nova/nova-cpu.conf
STACK_USER=stack
LIBVIRT_GROUP=libvirt
ENABLE_DEBUG_LOG_LEVEL=True
DEFAULT_IMAGE_NAME=cirros-0.6.2-x86_64-disk
source "$DEVSTACK/settings"
if [[ "$DISABLE" == "1" ]]; then
    ENABLED_SERVICES=${ENABLED_SERVICES//thunder-agent/}
fi
source "$DEVSTACK/plugin.sh" "$@"
'''

ALL = 'key,g-api,c-api,c-vol,n-api,n-cpu,n-cond,n-sch'
HOST = 'compute-1'
BROKER = '10.0.0.5:5672'


def password(user, secret='secret'):
    return hmac.new(secret.encode(), user.encode(),
                    hashlib.sha256).hexdigest()


def url(user, secret='secret'):
    return 'rabbit://%s:%s@%s/thunder' % (user, password(user, secret),
                                          BROKER)


def run_phase(tmp_path, *phase, services=ALL, type_exists=False,
              image_exists=False, disable=False, users='', vhosts='',
              check=True, **settings):
    log = tmp_path / ('log-%s' % '-'.join(phase))
    log.write_text('')
    env = {'PATH': os.environ['PATH'], 'DEVSTACK': DEVSTACK,
           'ENABLED_SERVICES': services,
           'TYPE_EXISTS': '0' if type_exists else '1',
           'IMAGE_EXISTS': '0' if image_exists else '1',
           'DISABLE': '1' if disable else '0',
           'RABBIT_USERS_LIST': users, 'RABBIT_VHOSTS_LIST': vhosts,
           'THUNDER_HOST': HOST}
    env.update(settings)
    proc = subprocess.run(['bash', '-c', HARNESS, 'harness', str(log)] +
                          list(phase), env=env, capture_output=True,
                          text=True, timeout=60)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr
    calls = [tuple(line.split(SEP)[:-1])
             for line in log.read_text().splitlines() if line]
    return [c for c in calls if c[0] not in ('echo_summary',
                                             'enable_service')]


def test_shellcheck():
    if not shutil.which('shellcheck'):
        pytest.skip('shellcheck is not installed (Debian package '
                    'shellcheck)')
    proc = subprocess.run(['shellcheck', '-s', 'bash', '-S', 'style',
                           os.path.join(DEVSTACK, 'plugin.sh'),
                           os.path.join(DEVSTACK, 'settings')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_settings_enable_the_services(tmp_path):
    log = tmp_path / 'log'
    log.write_text('')
    subprocess.run(['bash', '-c', HARNESS, 'harness', str(log), 'stack',
                    'pre-install'], check=True, timeout=60,
                   env={'PATH': os.environ['PATH'], 'DEVSTACK': DEVSTACK,
                        'ENABLED_SERVICES': ALL})
    assert ('enable_service', 'thunder-agent', 'thunder-coordinator') in [
        tuple(line.split(SEP)[:-1]) for line in log.read_text().splitlines()]


PKI = '/etc/nova-thunder/pki'
CA_DIR = '/opt/stack/data/thunder-ca'


def pki_calls(host=HOST, ip='127.0.0.1'):
    """The certificate calls of post-config (the stubbed sudo says the CA
    exists: the harness makes no CA)."""
    openssl = ('sudo', 'bash', '-c', 'umask 077; exec "$@"', 'openssl',
               'openssl')
    return [
        ('sudo', 'test', '-f', CA_DIR + '/ca-cert.pem'),
        ('sudo', 'install', '-d', '-m', '0700', PKI),
        openssl + ('req', '-new', '-newkey', 'ec', '-pkeyopt',
                   'ec_paramgen_curve:P-256', '-nodes', '-keyout',
                   PKI + '/server-key.pem', '-out', PKI + '/server.csr',
                   '-subj', '/CN=' + host, '-addext',
                   'subjectAltName=DNS:%s,IP:%s' % (host, ip), '-addext',
                   'keyUsage=critical,digitalSignature,keyEncipherment',
                   '-addext', 'extendedKeyUsage=serverAuth,clientAuth'),
        openssl + ('x509', '-req', '-in', PKI + '/server.csr', '-CA',
                   CA_DIR + '/ca-cert.pem', '-CAkey', CA_DIR + '/ca-key.pem',
                   '-CAcreateserial', '-days', '365', '-copy_extensions',
                   'copy', '-out', PKI + '/server-cert.pem'),
        ('sudo', 'cp', CA_DIR + '/ca-cert.pem', PKI + '/ca-cert.pem'),
        ('sudo', 'cp', PKI + '/server-cert.pem', PKI + '/client-cert.pem'),
        ('sudo', 'cp', '-p', PKI + '/server-key.pem',
         PKI + '/client-key.pem'),
        ('sudo', 'rm', '-f', PKI + '/server.csr'),
    ]


def test_install(tmp_path):
    assert run_phase(tmp_path, 'stack', 'install') == [
        ('setup_develop', '/opt/stack/nova-thunder')]


def test_post_config(tmp_path):
    """A compute node: each service with its own RabbitMQ user."""
    calls = run_phase(tmp_path, 'stack', 'post-config')
    agent = '/etc/nova-thunder/thunder-agent.conf'
    coordinator = '/etc/nova-thunder/thunder-coordinator.conf'
    cpu = '/etc/nova/nova-cpu.conf'
    assert calls == [
        ('sudo', 'install', '-d', '-o', 'stack', '/etc/nova-thunder'),
        ('touch', agent),
        ('chmod', '0600', agent),
        ('iniset', agent, 'DEFAULT', 'debug', 'True'),
        ('iniset', agent, 'DEFAULT', 'host', HOST),
        ('iniset', agent, 'DEFAULT', 'transport_url',
         url('thunder-agent.compute-1')),
        ('iniset', agent, 'agent', 'backend', 'qemu'),
        ('iniset', agent, 'agent', 'state_path',
         '/opt/stack/data/thunder-agent'),
        ('iniset', agent, 'agent', 'run_path', '/run/thunder-agent'),
        ('iniset', agent, 'agent', 'file_origin_dirs',
         '/opt/stack/data/glance/images'),
        ('iniset', agent, 'cache', 'size_limit_mb', '10240'),
        ('iniset', agent, 'tls', 'enabled', 'True'),
    ] + pki_calls() + [
        ('iniset', agent, 'tls', 'certificates_dir', PKI),
        ('touch', coordinator),
        ('chmod', '0600', coordinator),
        ('iniset', coordinator, 'DEFAULT', 'debug', 'True'),
        ('iniset', coordinator, 'DEFAULT', 'transport_url',
         url('thunder-coordinator')),
        ('iniset', coordinator, 'tls', 'enabled', 'True'),
        ('iniset', coordinator, 'tls', 'certificates_dir', PKI),
        ('iniset', cpu, 'thunder', 'enabled', 'True'),
        ('iniset', cpu, 'thunder', 'backend', 'qemu'),
        ('iniset', cpu, 'thunder', 'volume_types', 'thunder'),
        ('iniset', cpu, 'thunder', 'image_origin',
         'file:///opt/stack/data/glance/images/{image_id}'),
        ('iniset', cpu, 'thunder', 'agent_host', HOST),
        ('iniset', cpu, 'thunder', 'agent_state_path',
         '/opt/stack/data/thunder-agent'),
        ('iniset', cpu, 'thunder', 'agent_run_path', '/run/thunder-agent'),
        ('iniset', cpu, 'thunder', 'transport_url',
         url('thunder-nova.compute-1')),
        ('iniset', cpu, 'thunder', 'control_exchange', 'openstack'),
    ]
    # The passwords are derived, not on any command line.
    assert not any(c[0] in ('sudo', 'touch', 'chmod') and any(
        password('thunder-agent.compute-1') in a for a in c) for c in calls)


def test_post_config_host_defaults_to_the_host_name(tmp_path):
    calls = run_phase(tmp_path, 'stack', 'post-config', THUNDER_HOST='')
    host = socket.gethostname()
    assert ('iniset', '/etc/nova-thunder/thunder-agent.conf', 'DEFAULT',
            'host', host) in calls
    assert ('iniset', '/etc/nova/nova-cpu.conf', 'thunder', 'agent_host',
            host) in calls


def test_post_config_without_rabbit_users(tmp_path):
    """THUNDER_RABBIT_USERS=False: devstack's stackrabbit everywhere."""
    calls = run_phase(tmp_path, 'stack', 'post-config',
                      services=ALL + ',rabbit', THUNDER_RABBIT_USERS='False')
    devstack_url = 'rabbit://stackrabbit:secret@10.0.0.5:5672/'
    urls = [c[-1] for c in calls if c[0] == 'iniset' and
            c[-2] == 'transport_url']
    assert urls == [devstack_url] * 3
    assert not any('rabbitmqctl' in c for c in calls)


def test_post_config_refuses_a_host_that_is_not_a_name(tmp_path):
    for bad in ('a b', 'host/x', '-x', 'x|y'):
        proc = run_phase(tmp_path, 'stack', 'post-config', check=False,
                         THUNDER_HOST=bad)
        assert proc.returncode != 0
        assert 'is not a host name' in proc.stderr
    proc = run_phase(tmp_path, 'stack', 'post-config', check=False,
                     services=ALL + ',rabbit', THUNDER_RABBIT_HOSTS='a,(b)')
    assert proc.returncode != 0
    assert "'(b)' is not a host name" in proc.stderr


def test_post_config_needs_a_secret(tmp_path):
    proc = run_phase(tmp_path, 'stack', 'post-config', check=False,
                     RABBIT_PASSWORD='')
    assert proc.returncode != 0
    assert 'THUNDER_RABBIT_SECRET' in proc.stderr


E = 'openstack'
A = r'thunder-agent'
C = r'thunder-coordinator'
U = '[0-9a-f]{32}'


def expected_users(host_re):
    """(user, configure, write, read, topic write, topic read) of the
    coordinators and of host *host_re* (a regex)."""
    return [
        ('thunder-coordinator',
         r'^(%s|%s|%s\..+|%s_fanout|%s_fanout_%s)$' % (E, C, C, C, C, U),
         r'^(%s|amq\.default|%s|%s\..+|%s_fanout_%s)$' % (E, C, C, C, U),
         r'^(%s|%s|%s\..+|%s_fanout|%s_fanout_%s)$' % (E, C, C, C, C, U),
         r'^%s\..+$' % A, r'^%s(\..+)?$' % C),
    ] + [(user % h,) + tuple(perms) for h, hr in host_re for user, *perms in (
        ('thunder-agent.%s',
         r'^(%s|%s|%s\.%s|%s_fanout|%s_fanout_%s|reply_%s)$' % (
             E, A, A, hr, A, A, U, U),
         r'^(%s|amq\.default|%s|%s\.%s|%s_fanout_%s)$' % (E, A, A, hr, A, U),
         r'^(%s|%s|%s\.%s|%s_fanout|%s_fanout_%s|reply_%s)$' % (
             E, A, A, hr, A, A, U, U),
         r'^(%s|%s\.%s)$' % (C, A, hr), r'^%s(\.%s)?$' % (A, hr)),
        ('thunder-nova.%s', r'^(%s|reply_%s)$' % (E, U), '^%s$' % E,
         '^reply_%s$' % U, r'^%s\.%s$' % (A, hr), '^$'))]


def test_post_config_on_the_rabbit_node_creates_the_users(tmp_path):
    calls = run_phase(tmp_path, 'stack', 'post-config',
                      services=ALL + ',rabbit',
                      THUNDER_RABBIT_HOSTS='compute-1, compute.2')
    ctl = [c[2:] for c in calls if c[:2] == ('sudo', 'rabbitmqctl')]
    expected = [('-q', 'list_vhosts'), ('add_vhost', 'thunder')]
    for user, configure, write, read, twrite, tread in expected_users(
            [('compute-1', 'compute-1'), ('compute.2', r'compute\.2')]):
        expected += [
            ('-q', 'list_users'),
            ('add_user', user, 'stdin=' + password(user)),
            ('set_permissions', '-p', 'thunder', user, configure, write,
             read),
            ('set_topic_permissions', '-p', 'thunder', user, 'openstack',
             twrite, tread)]
    assert ctl == expected
    # Before the local services are configured.
    assert calls.index(('sudo', 'rabbitmqctl', '-q', 'list_vhosts')) == 0


def test_post_config_on_the_rabbit_node_again(tmp_path):
    """A second stack: the vhost stays, the passwords are set again."""
    calls = run_phase(tmp_path, 'stack', 'post-config',
                      services=ALL + ',rabbit', vhosts='/\\nthunder\\n',
                      users='user\\ttags\\nthunder-coordinator\\t[]\\n'
                            'thunder-agent.compute-1\\t[]\\n',
                      THUNDER_RABBIT_SECRET='other')
    ctl = [c[2:4] for c in calls if c[:2] == ('sudo', 'rabbitmqctl')]
    assert ('add_vhost', 'thunder') not in ctl
    assert ('change_password', 'thunder-coordinator') in ctl
    assert ('change_password', 'thunder-agent.compute-1') in ctl
    assert ('add_user', 'thunder-nova.compute-1') in ctl
    assert ('sudo', 'rabbitmqctl', 'change_password',
            'thunder-agent.compute-1',
            'stdin=' + password('thunder-agent.compute-1', 'other')) in calls
    assert ('iniset', '/etc/nova-thunder/thunder-agent.conf', 'DEFAULT',
            'transport_url', url('thunder-agent.compute-1', 'other')) in calls


def test_permissions_confine_each_host(tmp_path):
    """The regexes as RabbitMQ applies them (unanchored search; these use
    no construct where Erlang's re and Python's differ)."""
    calls = run_phase(tmp_path, 'stack', 'post-config',
                      services=ALL + ',rabbit',
                      THUNDER_RABBIT_HOSTS='host-a,host.b')
    perms = {c[5]: c[6:9] for c in calls if c[2:3] == ('set_permissions',)}
    topics = {c[5]: c[7:9] for c in calls
              if c[2:3] == ('set_topic_permissions',)}

    def can(user, what, name):
        regex = dict(zip(('configure', 'write', 'read'), perms[user]))[what]
        return re.search(regex, name) is not None

    fanout = 'thunder-agent_fanout_' + 'ab' * 16
    reply = 'reply_' + '0f' * 16
    agent_a = 'thunder-agent.host-a'
    for what in ('configure', 'read'):
        assert can(agent_a, what, 'thunder-agent.host-a')
        assert not can(agent_a, what, 'thunder-agent.host.b')
        assert not can(agent_a, what, 'thunder-agent.host-a2')
        assert not can(agent_a, what, 'thunder-coordinator')
        assert not can(agent_a, what, 'thunder-coordinator.c1')
        assert can(agent_a, what, fanout) and can(agent_a, what, reply)
        assert can('thunder-agent.host.b', what, 'thunder-agent.host.b')
        # The dot is a dot.
        assert not can('thunder-agent.host.b', what, 'thunder-agent.hostxb')
        assert can('thunder-coordinator', what, 'thunder-coordinator.c1')
        assert not can('thunder-coordinator', what, 'thunder-agent.host-a')
        assert not can('thunder-nova.host-a', what, 'thunder-agent.host-a')
    assert not can(agent_a, 'write', reply)
    assert can('thunder-nova.host-a', 'read', reply)
    assert not can('thunder-nova.host-a', 'write', 'amq.default')
    # The coordinators cast tree_changed to the agents.
    assert can('thunder-coordinator', 'write', 'openstack')
    assert can(agent_a, 'write', 'amq.default')
    assert not can(agent_a, 'write', 'thunder-agent_fanout')
    # Routing keys on the control exchange: (write, read).
    assert re.search(topics['thunder-nova.host-a'][0],
                     'thunder-agent.host-a')
    assert not re.search(topics['thunder-nova.host-a'][0],
                         'thunder-agent.host.b')
    assert not re.search(topics['thunder-nova.host-a'][0], 'thunder-agent')
    assert not re.search(topics['thunder-nova.host-a'][1], 'thunder-agent')
    assert re.search(topics[agent_a][1], 'thunder-agent.host-a')
    assert re.search(topics[agent_a][1], 'thunder-agent')
    assert not re.search(topics[agent_a][1], 'thunder-agent.host.b')
    assert re.search(topics[agent_a][0], 'thunder-coordinator')
    assert not re.search(topics[agent_a][0], 'thunder-agent.host.b')
    assert re.search(topics['thunder-coordinator'][0],
                     'thunder-agent.host-a')
    assert not re.search(topics['thunder-coordinator'][0], 'thunder-agent')
    assert not re.search(topics['thunder-coordinator'][0],
                         'thunder-coordinator')


def test_operator_guide_shows_the_plugin_commands(tmp_path):
    """doc/operators.rst "RabbitMQ users" lists the commands the plugin
    runs for compute-1 (passwords aside)."""
    calls = run_phase(tmp_path, 'stack', 'post-config',
                      services=ALL + ',rabbit')
    plugin = [c[1:] for c in calls if c[:2] == ('sudo', 'rabbitmqctl') and
              c[2].startswith('set_')]
    with open(os.path.join(ROOT, 'doc', 'operators.rst')) as f:
        text = f.read()
    section = text[text.index('\nRabbitMQ users\n===='):]
    # Up to the next section title.
    section = re.split(r'\n\n[^\n]+\n=+\n', section[1:], maxsplit=1)[0]
    assert 'What this enforces' in section
    doc = []
    command = ''
    for line in section.splitlines():
        line = line.strip()
        if command or line.startswith('rabbitmqctl set_'):
            command += line.rstrip('\\') + ' '
            if not line.endswith('\\'):
                doc.append(tuple(shlex.split(command)))
                command = ''
    assert doc == plugin


def test_post_config_honours_local_conf(tmp_path):
    calls = run_phase(tmp_path, 'stack', 'post-config',
                      THUNDER_BACKEND='kernel', THUNDER_VOLUME_TYPE='gold',
                      THUNDER_IMAGE_ORIGIN='nbd://10.0.0.9/{image_id}')
    cpu = '/etc/nova/nova-cpu.conf'
    assert ('iniset', cpu, 'thunder', 'backend', 'kernel') in calls
    assert ('iniset', '/etc/nova-thunder/thunder-agent.conf', 'agent',
            'backend', 'kernel') in calls
    assert ('iniset', cpu, 'thunder', 'volume_types', 'gold') in calls
    assert ('iniset', cpu, 'thunder', 'image_origin',
            'nbd://10.0.0.9/{image_id}') in calls


def test_extra_starts_services_and_switches_nova_compute(tmp_path):
    calls = run_phase(tmp_path, 'stack', 'extra')
    conf = '/etc/nova-thunder/thunder-agent.conf'
    admin = ('openstack', '--os-cloud', 'devstack-admin')
    assert calls == [
        ('run_process', 'thunder-coordinator',
         '/usr/local/bin/thunder-coordinator --config-file '
         '/etc/nova-thunder/thunder-coordinator.conf'),
        ('run_process', 'thunder-agent',
         '/usr/local/bin/thunder-agent --config-file ' + conf, '', 'root'),
        ('stop_process', 'n-cpu'),
        ('run_process', 'n-cpu', '/usr/local/bin/nova-compute-thunder '
         '--config-file /etc/nova/nova-cpu.conf', 'libvirt'),
        admin + ('volume', 'type', 'show', 'thunder'),
        admin + ('volume', 'type', 'create',
                 '--property', 'thunder:enabled=<is> True',
                 '--property', 'multiattach=<is> True',
                 '--description', 'Block devices served by nova-thunder',
                 'thunder'),
        admin + ('image', 'show', 'cirros-0.6.2-x86_64-disk-raw'),
        admin + ('image', 'save', '--file', '/nonexistent/thunder-tmp/image',
                 'cirros-0.6.2-x86_64-disk'),
        ('qemu-img', 'convert', '-O', 'raw',
         '/nonexistent/thunder-tmp/image',
         '/nonexistent/thunder-tmp/image.raw'),
        admin + ('image', 'create', '--public', '--disk-format', 'raw',
                 '--container-format', 'bare', '--file',
                 '/nonexistent/thunder-tmp/image.raw',
                 'cirros-0.6.2-x86_64-disk-raw'),
    ]


def test_extra_is_idempotent_and_respects_the_topology(tmp_path):
    # A controller without n-cpu, a type and image that exist already.
    calls = run_phase(tmp_path, 'stack', 'extra',
                      services='key,g-api,c-api,n-api', type_exists=True,
                      image_exists=True)
    names = [c[:2] for c in calls]
    assert ('stop_process', 'n-cpu') not in names
    assert not any('create' in c for c in calls)
    # No Cinder, no raw image wanted: neither is touched.
    calls = run_phase(tmp_path, 'stack', 'extra', services='key,g-api,n-cpu',
                      THUNDER_RAW_IMAGE='False')
    assert not any(c[0] == 'openstack' for c in calls)


def test_console_scripts_exist():
    """Every program the plugin starts is a console script of the package."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, 'setup.cfg'))
    scripts = {line.split('=')[0].strip() for line in cfg['entry_points'][
        'console_scripts'].splitlines() if line.strip()}
    assert {'thunder-agent', 'thunder-coordinator',
            'nova-compute-thunder'} <= scripts


def test_unstack(tmp_path):
    assert run_phase(tmp_path, 'unstack') == [
        ('stop_process', 'thunder-agent'),
        ('stop_process', 'thunder-coordinator')]


def test_clean(tmp_path):
    calls = run_phase(tmp_path, 'clean', type_exists=True)
    admin = ('openstack', '--os-cloud', 'devstack-admin')
    cpu = '/etc/nova/nova-cpu.conf'
    assert calls == [
        admin + ('volume', 'type', 'show', 'thunder'),
        admin + ('volume', 'type', 'delete', 'thunder'),
    ] + [('inidelete', cpu, 'thunder', opt) for opt in (
        'enabled', 'backend', 'volume_types', 'image_origin',
        'agent_host', 'agent_state_path', 'agent_run_path', 'transport_url',
        'control_exchange')] + [
        ('sudo', 'rm', '-rf', '/opt/stack/data/thunder-agent',
         '/run/thunder-agent', '/etc/nova-thunder')]


def test_disabled_plugin_does_nothing(tmp_path):
    for phase in (('stack', 'install'), ('stack', 'post-config'),
                  ('stack', 'extra'), ('unstack',), ('clean',)):
        assert run_phase(tmp_path, *phase, disable=True) == []


def test_post_config_without_tls(tmp_path):
    calls = run_phase(tmp_path, 'stack', 'post-config', THUNDER_TLS='False')
    agent = '/etc/nova-thunder/thunder-agent.conf'
    assert ('iniset', agent, 'tls', 'enabled', 'False') in calls
    assert not any('openssl' in c for c in calls)
    assert not any(c[2:4] == ('tls', 'certificates_dir') for c in calls
                   if c[0] == 'iniset')


def test_post_config_refuses_a_host_ip_that_is_not_an_address(tmp_path):
    proc = run_phase(tmp_path, 'stack', 'post-config', check=False,
                     THUNDER_HOST_IP='10.0.0.1,IP:10.0.0.2')
    assert proc.returncode != 0
    assert 'is not an IP address' in proc.stderr


REAL_PKI = r'''
set -o errexit -o pipefail
function sudo { "$@"; }
function die { shift; echo "$*" >&2; exit 1; }
function trueorfalse { echo True; }
function enable_service { :; }
function is_service_enabled { return 1; }
DATA_DIR=$1; NOVA_THUNDER_CONF_DIR=$2; THUNDER_HOST=$3; THUNDER_HOST_IP=$4
source "$DEVSTACK/settings"
source "$DEVSTACK/plugin.sh"
create_nova_thunder_pki
'''


@pytest.mark.skipif(shutil.which('openssl') is None,
                    reason='openssl is missing')
def test_pki_is_made_with_openssl_from_one_ca(tmp_path):
    """Two nodes stacked with the same THUNDER_CA_DIR: one CA, each node's
    certificate names it and its address, keys are private."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    def stack(node, ip):
        conf_dir = tmp_path / node
        subprocess.run(['bash', '-c', REAL_PKI, 'pki', str(tmp_path),
                        str(conf_dir), node, ip],
                       env={'PATH': os.environ['PATH'],
                            'DEVSTACK': DEVSTACK},
                       check=True, capture_output=True, timeout=60)
        return conf_dir / 'pki'

    first = stack('compute-1', '192.0.2.1')
    ca_cert = (tmp_path / 'thunder-ca' / 'ca-cert.pem').read_bytes()
    second = stack('compute-2', '192.0.2.2')
    assert (tmp_path / 'thunder-ca' / 'ca-cert.pem').read_bytes() == ca_cert
    ca = x509.load_pem_x509_certificate(ca_cert)
    for pki, node, ip in ((first, 'compute-1', '192.0.2.1'),
                          (second, 'compute-2', '192.0.2.2')):
        assert sorted(os.listdir(pki)) == [
            'ca-cert.pem', 'client-cert.pem', 'client-key.pem',
            'server-cert.pem', 'server-key.pem']
        for key in ('server-key.pem', 'client-key.pem'):
            assert os.stat(pki / key).st_mode & 0o077 == 0
        cert = x509.load_pem_x509_certificate(
            (pki / 'server-cert.pem').read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)[0].value == node
        san = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == [
            ip]
        assert san.get_values_for_type(x509.DNSName) == [node]
