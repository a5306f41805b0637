"""devstack/plugin.sh: shellcheck, and what each phase does.

The plugin is sourced by bash exactly as devstack sources it (settings
first, then ``plugin.sh <mode> <phase>``), with devstack's functions
replaced by stubs that record their calls.
"""

import configparser
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEVSTACK = os.path.join(ROOT, 'devstack')
SEP = '\x1f'

HARNESS = r'''
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
function sudo { _log sudo "$@"; }
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


def run_phase(tmp_path, *phase, services=ALL, type_exists=False,
              image_exists=False, disable=False, **settings):
    log = tmp_path / ('log-%s' % '-'.join(phase))
    log.write_text('')
    env = {'PATH': os.environ['PATH'], 'DEVSTACK': DEVSTACK,
           'ENABLED_SERVICES': services,
           'TYPE_EXISTS': '0' if type_exists else '1',
           'IMAGE_EXISTS': '0' if image_exists else '1',
           'DISABLE': '1' if disable else '0'}
    env.update(settings)
    proc = subprocess.run(['bash', '-c', HARNESS, 'harness', str(log)] +
                          list(phase), env=env, capture_output=True,
                          text=True, timeout=60)
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


def test_install(tmp_path):
    assert run_phase(tmp_path, 'stack', 'install') == [
        ('setup_develop', '/opt/stack/nova-thunder')]


def test_post_config(tmp_path):
    calls = run_phase(tmp_path, 'stack', 'post-config')
    agent = '/etc/nova-thunder/thunder-agent.conf'
    cpu = '/etc/nova/nova-cpu.conf'
    url = 'rabbit://stackrabbit:secret@10.0.0.5:5672/'
    assert calls == [
        ('sudo', 'install', '-d', '-o', 'stack', '/etc/nova-thunder'),
        ('iniset', agent, 'DEFAULT', 'debug', 'True'),
        ('iniset', agent, 'DEFAULT', 'transport_url', url),
        ('iniset', agent, 'agent', 'backend', 'qemu'),
        ('iniset', agent, 'agent', 'state_path',
         '/opt/stack/data/thunder-agent'),
        ('iniset', agent, 'agent', 'run_path', '/run/thunder-agent'),
        ('iniset', agent, 'agent', 'file_origin_dirs',
         '/opt/stack/data/glance/images'),
        ('iniset', agent, 'cache', 'size_limit_mb', '10240'),
        ('iniset', cpu, 'thunder', 'enabled', 'True'),
        ('iniset', cpu, 'thunder', 'backend', 'qemu'),
        ('iniset', cpu, 'thunder', 'volume_types', 'thunder'),
        ('iniset', cpu, 'thunder', 'image_origin',
         'file:///opt/stack/data/glance/images/{image_id}'),
        ('iniset', cpu, 'thunder', 'agent_state_path',
         '/opt/stack/data/thunder-agent'),
        ('iniset', cpu, 'thunder', 'agent_run_path', '/run/thunder-agent'),
        ('iniset', cpu, 'thunder', 'transport_url', url),
        ('iniset', cpu, 'thunder', 'control_exchange', 'openstack'),
    ]


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
         '/usr/local/bin/thunder-coordinator --config-file ' + conf),
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
        'agent_state_path', 'agent_run_path', 'transport_url',
        'control_exchange')] + [
        ('sudo', 'rm', '-rf', '/opt/stack/data/thunder-agent',
         '/run/thunder-agent', '/etc/nova-thunder')]


def test_disabled_plugin_does_nothing(tmp_path):
    for phase in (('stack', 'install'), ('stack', 'post-config'),
                  ('stack', 'extra'), ('unstack',), ('clean',)):
        assert run_phase(tmp_path, *phase, disable=True) == []
