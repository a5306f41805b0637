"""nova-compute accepts only the local agent's own disks (issue 10, 5b).

A forged answer to prepare (anything answering on the agent's topic) must
not point libvirt at a host file, another instance's overlay, another
image's template or a host block device.
"""

import copy

from oslo_config import cfg
import pytest

from nova_thunder import exception
from nova_thunder import layout
from thunder_agent import conf as agent_conf
from thunder_agent.drivers.kernel import dmtables
from thunder_agent.drivers.kernel import driver as kernel_driver
from thunder_agent.drivers.qemu import driver as qemu_driver
from thunder_agent import records
from thunder_agent import store as store_mod

INSTANCE = '5e3f2c1b-9a8d-4e7f-b6a5-4c3d2e1f0a9b'
OTHER_INSTANCE = '0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d'
IMAGE = '3a1f6d0e-8c2b-4b5e-a7a4-6a0f5e9b2c11'
OTHER_IMAGE = '8d7c1e52-5f0a-4d7e-9b8a-2c6e33c1d0f4'
STATE = '/var/lib/thunder-agent'
RUN = '/run/thunder-agent'


def qemu_info(**changes):
    data = {'backend': 'qemu', 'image_id': IMAGE, 'instance_id': INSTANCE,
            'path': '%s/snapshots/%s/overlay.qcow2' % (STATE, INSTANCE),
            'format': 'qcow2',
            'backing': {'driver': 'nbd', 'format': 'raw', 'export': IMAGE,
                        'socket': '%s/%s.nbd' % (RUN, IMAGE),
                        'reconnect_delay': 300}}
    backing = changes.pop('backing', {})
    data.update(changes)
    data['backing'] = dict(data['backing'], **backing)
    for key, value in list(data['backing'].items()):
        if value is None:
            del data['backing'][key]
    return {'driver_volume_type': 'thunder', 'data': data}


def kernel_info(**changes):
    data = {'backend': 'kernel', 'image_id': IMAGE, 'instance_id': INSTANCE,
            'device_path': '/dev/mapper/thunder-snap-' + INSTANCE,
            'format': 'raw'}
    data.update(changes)
    return {'driver_volume_type': 'thunder', 'data': data}


def tcp(host='127.0.0.1', port=10811):
    return {'socket': None, 'host': host, 'port': port}


def test_the_agents_disks_are_accepted():
    for info in (qemu_info(), qemu_info(backing=tcp()), kernel_info()):
        assert layout.check(info, INSTANCE, IMAGE) == info['data']


@pytest.mark.parametrize('info', [
    # Host files and other instances' or images' files.
    qemu_info(path='/etc/shadow'),
    qemu_info(path='/dev/sda'),
    qemu_info(path='%s/snapshots/%s/overlay.qcow2' % (STATE, OTHER_INSTANCE)),
    qemu_info(path='%s/snapshots/%s/../%s/overlay.qcow2'
              % (STATE, INSTANCE, OTHER_INSTANCE)),
    qemu_info(path='%s/templates/%s/cache.qcow2' % (STATE, IMAGE)),
    qemu_info(path='/srv/elsewhere/snapshots/%s/overlay.qcow2' % INSTANCE),
    # The overlay read as raw: the guest writes over its qcow2 metadata.
    qemu_info(format='raw'),
    # The backing: another image's template, another service's socket.
    qemu_info(backing={'socket': '%s/%s.nbd' % (RUN, OTHER_IMAGE)}),
    qemu_info(backing={'socket': '/var/run/libvirt/libvirt-sock'}),
    qemu_info(backing={'socket': '%s/../%s.nbd' % (RUN, IMAGE)}),
    qemu_info(backing={'export': OTHER_IMAGE}),
    # A backing parsed as qcow2 would follow the backing file its
    # (tenant-made) header names.
    qemu_info(backing={'format': 'qcow2'}),
    qemu_info(backing={'driver': 'file', 'socket': None,
                       'filename': '/etc/shadow'}),
    qemu_info(backing={'tls-creds': 'x'}),
    qemu_info(backing={'host': '127.0.0.1', 'port': 10811}),
    qemu_info(backing={'reconnect_delay': '300; rm -rf /'}),
    # TCP backings: another host, another port.
    qemu_info(backing=tcp(host='10.0.0.99')),
    qemu_info(backing=tcp(host='metadata.internal')),
    qemu_info(backing=tcp(port=22)),
    qemu_info(backing=tcp(port='10811')),
    # Kernel: host disks, the template itself, other instances' snapshots.
    kernel_info(device_path='/dev/sda'),
    kernel_info(device_path='/dev/mapper/thunder-%s-tpl' % IMAGE),
    kernel_info(device_path='/dev/mapper/thunder-snap-' + OTHER_INSTANCE),
    kernel_info(device_path='/dev/mapper/other-snap-' + INSTANCE),
    kernel_info(format='qcow2'),
    # Ids: another instance, another image, paths in disguise.
    qemu_info(instance_id=OTHER_INSTANCE),
    kernel_info(image_id=OTHER_IMAGE),
    qemu_info(image_id='../../etc'),
    kernel_info(instance_id=INSTANCE.upper()),
])
def test_forged_disks_are_refused(info):
    with pytest.raises(exception.InvalidThunderDisk) as e:
        layout.check(info, INSTANCE, IMAGE)
    message = e.value.format_message()
    # The fault a tenant reads names no path.
    assert message == ('Invalid thunder connection_info: it is not a disk '
                       'of the thunder agent of this host (see the '
                       'nova-compute log)'), message


@pytest.mark.parametrize('info, words', [
    (None, 'no data'),
    ({'driver_volume_type': 'thunder'}, 'no data'),
    (qemu_info(backend='zfs'), "unknown backend 'zfs'"),
    (qemu_info(path=''), 'qemu backend disk without path'),
    (kernel_info(device_path=None), 'kernel backend disk without device'),
])
def test_malformed_disks_are_refused(info, words):
    with pytest.raises(exception.InvalidThunderDisk) as e:
        layout.check(info, INSTANCE)
    assert words in e.value.format_message()


def test_options_name_the_agents_layout(flags):
    flags(agent_state_path='/opt/stack/data/thunder-agent',
          agent_run_path='/run/ta', agent_relay_address='10.0.0.7',
          agent_relay_port_min=20000, agent_relay_port_max=20001,
          agent_device_prefix='tb')
    ok = qemu_info(
        path='/opt/stack/data/thunder-agent/snapshots/%s/overlay.qcow2'
             % INSTANCE,
        backing={'socket': '/run/ta/%s.nbd' % IMAGE})
    layout.check(ok, INSTANCE, IMAGE)
    layout.check(qemu_info(path=ok['data']['path'],
                           backing=tcp('10.0.0.7', 20001)), INSTANCE, IMAGE)
    layout.check(kernel_info(device_path='/dev/mapper/tb-snap-' + INSTANCE),
                 INSTANCE)
    for bad in (qemu_info(), qemu_info(path=ok['data']['path'],
                                       backing=tcp('10.0.0.7', 20002)),
                kernel_info()):
        with pytest.raises(exception.InvalidThunderDisk):
            layout.check(bad, INSTANCE, IMAGE)


def test_ipv6_relay_address_compares_as_an_address(flags):
    flags(agent_relay_address='fd00::7')
    layout.check(qemu_info(backing=tcp('fd00:0:0::7')), INSTANCE)


# -- the agent's drivers produce exactly this layout ----------------------

@pytest.fixture
def agent(flags, tmp_path):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('state_path', str(tmp_path / 'state'), group='agent')
    conf.set_override('run_path', str(tmp_path / 'run'), group='agent')
    conf.set_override('device_prefix', 'thx', group='kernel')
    flags(agent_state_path=str(tmp_path / 'state'),
          agent_run_path=str(tmp_path / 'run'), agent_device_prefix='thx')
    return conf


def _template(export=None):
    return records.Template(
        image_id=IMAGE, size=1 << 20, image_format='raw', driver='qemu',
        origin=records.Endpoint('nbd', {'host': '192.0.2.1', 'port': 10809,
                                        'export': IMAGE}),
        export=export)


def test_qemu_drivers_answers_pass(agent):
    driver = qemu_driver.QemuDriver(agent)
    sdir = store_mod.StateStore(agent.agent.state_path).snapshot_dir(
        INSTANCE)
    info = driver._connection_info(_template(), INSTANCE, sdir)
    assert layout.check(info, INSTANCE, IMAGE)['backing']['socket']
    relay = records.RelayAddress('127.0.0.1', 10811, IMAGE)
    # A relaying template being built, and one whose VMs were given the
    # TCP export (records of earlier agents).
    for export in (records.Export('qemu', {}, relay),
                   records.Export('qemu', {'host': '127.0.0.1',
                                           'port': 10811, 'export': IMAGE},
                                  relay)):
        info = driver._connection_info(_template(export), INSTANCE, sdir)
        assert layout.check(info, INSTANCE, IMAGE) == info['data']


def test_kernel_drivers_answers_pass(agent):
    driver = kernel_driver.KernelDriver(agent)
    info = driver._connection_info(_template(), INSTANCE)
    assert layout.check(info, INSTANCE, IMAGE)['device_path'] == (
        '/dev/mapper/' + dmtables.snapshot_name('thx', INSTANCE))


def test_refusal_is_logged_with_the_detail(caplog):
    forged = qemu_info(path='/etc/shadow')
    with pytest.raises(exception.InvalidThunderDisk):
        layout.check(copy.deepcopy(forged), INSTANCE)
    assert '/etc/shadow' in caplog.text
