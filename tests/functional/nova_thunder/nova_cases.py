"""Servers with thunder block devices through Nova's API, in-process.

Nova's own functional harness (API, conductor, scheduler, placement,
nova-compute with the real libvirt driver on Nova's fake libvirt, Cinder
and Glance fixtures, sqlite) with nova-thunder wired in, talking to a real
thunder agent over a real RabbitMQ. Run by test_nova_server.py in its own
process: Nova's test harness sets the process's concurrency mode, which the
rest of the test suite must not inherit. Not collected on its own.

Environment (set by test_nova_server.py): THUNDER_TRANSPORT_URL,
THUNDER_AGENT_HOST, THUNDER_IMAGE_PATH, THUNDER_IMAGE_SIZE,
THUNDER_IMAGE_STORE (a directory of the agent's file_origin_dirs, where the
image is linked under its id, as Glance's file store names files),
THUNDER_AGENT_STATE_PATH, THUNDER_AGENT_RUN_PATH, and optionally
THUNDER_ISCSI (JSON: portal, iqn, user, password) for a golden volume.
"""

# Nova's functional package first: it settles the concurrency mode.
from nova.tests import functional  # noqa: F401  isort:skip

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from unittest import mock  # noqa: E402

from lxml import etree  # noqa: E402
from oslo_serialization import jsonutils  # noqa: E402

from nova import context as nova_context  # noqa: E402
from nova import objects  # noqa: E402
from nova import test  # noqa: E402
from nova.tests import fixtures as nova_fixtures  # noqa: E402
from nova.tests.fixtures import libvirt as fakelibvirt  # noqa: E402
from nova.tests.functional.libvirt import base  # noqa: E402

from nova_thunder import agent as agent_client  # noqa: E402
from nova_thunder import block_device  # noqa: E402
from nova_thunder import marking  # noqa: E402
from nova_thunder import wiring  # noqa: E402

THUNDER_TYPE_ID = '6f3d1a8e-2b4c-4d5e-9f60-7a8b9c0d1e2f'
GOLDEN_VOLUME = str(uuid.uuid5(uuid.NAMESPACE_URL, 'thunder-golden'))
IMAGE = str(uuid.uuid5(uuid.NAMESPACE_URL, 'thunder-image'))
BAD_IMAGE = str(uuid.uuid5(uuid.NAMESPACE_URL, 'thunder-bad-image'))


class ThunderCinderFixture(nova_fixtures.CinderFixture):
    """Nova's Cinder fixture plus a 'thunder' volume type and, when an
    iSCSI target is given, a golden multi-attach volume of that type."""

    def __init__(self, test, iscsi=None):
        super().__init__(test)
        self.iscsi = iscsi
        self.VOLUME_CONNECTION_INFO = copy.deepcopy(
            self.VOLUME_CONNECTION_INFO)
        if iscsi:
            # Cinder's LVM driver with tgt, as recorded on a devstack.
            self.VOLUME_CONNECTION_INFO[GOLDEN_VOLUME] = {
                'driver_volume_type': 'iscsi',
                'data': {'target_discovered': False,
                         'target_portal': iscsi['portal'],
                         'target_iqn': iscsi['iqn'], 'target_lun': 1,
                         'auth_method': 'CHAP',
                         'auth_username': iscsi['user'],
                         'auth_password': iscsi['password'],
                         'encrypted': False, 'qos_specs': None,
                         'access_mode': 'rw', 'cacheable': False,
                         'discard': False}}
            # The fixture lets this id be attached many times at once.
            self.MULTIATTACH_VOL = GOLDEN_VOLUME
            self.volumes[GOLDEN_VOLUME] = {
                'id': GOLDEN_VOLUME, 'display_name': 'golden', 'size': 1,
                'multiattach': True, 'availability_zone': 'nova',
                'bootable': True, 'volume_type_id': 'thunder',
                'volume_image_metadata': {'image_id': IMAGE,
                                          'disk_format': 'raw'}}

    def fake_get_all_volume_types(self, *args, **kwargs):
        return super().fake_get_all_volume_types() + [
            {'id': THUNDER_TYPE_ID, 'name': 'thunder'}]


class ThunderServersTest(base.ServersTestBase):
    microversion = 'latest'
    ADMIN_API = True

    def setUp(self):
        super().setUp()
        iscsi = os.environ.get('THUNDER_ISCSI')
        self.iscsi = json.loads(iscsi) if iscsi else None
        self.cinder = self.useFixture(
            ThunderCinderFixture(self, iscsi=self.iscsi))
        # Conversion looks volume types up in Cinder, here the fixture.
        marking._volume_types.forget()
        self.addCleanup(marking._volume_types.forget)

        wiring.apply()
        self.addCleanup(wiring.restore)
        store = os.environ['THUNDER_IMAGE_STORE']
        self.flags(transport_url=os.environ['THUNDER_TRANSPORT_URL'],
                   agent_host=os.environ['THUNDER_AGENT_HOST'],
                   agent_state_path=os.environ['THUNDER_AGENT_STATE_PATH'],
                   agent_run_path=os.environ['THUNDER_AGENT_RUN_PATH'],
                   image_origin='file://%s/{image_id}' % store,
                   timeout=120, group='thunder')
        agent_client.reset_client()
        self.addCleanup(agent_client.reset_client)
        # The agent outlives each test: leave it empty for the next one.
        self.addCleanup(self.empty_agent)

        size = int(os.environ['THUNDER_IMAGE_SIZE'])
        stored = os.path.join(store, IMAGE)
        os.link(os.environ['THUNDER_IMAGE_PATH'], stored)
        self.addCleanup(os.unlink, stored)
        for image_id, disk_format in ((IMAGE, 'raw'), (BAD_IMAGE, 'vmdk')):
            self.glance.create(None, {
                'id': image_id, 'name': 'thunder-' + disk_format,
                'status': 'active', 'disk_format': disk_format,
                'container_format': 'bare', 'size': size, 'min_ram': 0,
                'min_disk': 0, 'visibility': 'public', 'properties': {}})
        # Keep the domain XML Nova hands to libvirt (the fake libvirt's own
        # XMLDesc() only keeps the elements it models).
        self.defined = {}
        define = fakelibvirt.Connection.defineXML

        def record_define(conn, xml):
            dom = define(conn, xml)
            self.defined[dom.UUIDString()] = xml
            return dom

        self.stub_out('nova.tests.fixtures.libvirt.Connection.defineXML',
                      record_define)
        self.start_compute()
        self.ctxt = nova_context.get_admin_context()

    def _setup_services(self):
        # pip installs Nova's paste config under the environment's prefix,
        # not next to the package where Nova's test defaults look.
        paste = os.path.join(sys.prefix, 'etc', 'nova', 'api-paste.ini')
        if os.path.exists(paste):
            self.flags(api_paste_config=paste, group='wsgi')
        return super()._setup_services()

    # -- helpers ---------------------------------------------------------
    def agent_status(self):
        return agent_client.get_client().api.get_status(
            os.environ['THUNDER_AGENT_HOST'])

    def empty_agent(self):
        api = agent_client.get_client().api
        host = os.environ['THUNDER_AGENT_HOST']
        for snap in api.get_status(host)['snapshots']:
            api.delete_snapshot(host, snap['instance_id'])
        api.collect_garbage(host, max_idle=0)

    def snapshot_ids(self):
        return {s['instance_id'] for s in self.agent_status()['snapshots']}

    def root_bdm(self, server):
        bdms = objects.BlockDeviceMappingList.get_by_instance_uuid(
            self.ctxt, server['id'])
        return [b for b in bdms if b.boot_index == 0][0]

    def connection_info(self, server):
        return jsonutils.loads(self.root_bdm(server).connection_info)

    def domain_disk(self, server):
        xml = self.defined[server['id']]
        for disk in etree.fromstring(xml).findall('devices/disk'):
            if disk.find('target').get('dev') == 'vda':
                return disk
        self.fail('no vda in the domain of %s' % server['id'])

    def create(self, bdm, min_count=1, expected='ACTIVE'):
        body = self._build_server(networks='none')
        body.pop('imageRef', None)
        body['block_device_mapping_v2'] = [dict(bdm, boot_index=0)]
        body['min_count'] = body['max_count'] = min_count
        body['name'] = 'thunder-%s' % uuid.uuid4().hex[:6]
        self.api.post_server({'server': body})
        servers = [s for s in self.api.get_servers(
            search_opts={'name': body['name']})]
        self.assertEqual(min_count, len(servers))
        return [self._wait_for_state_change(s, expected, max_retries=60)
                for s in servers]

    def assert_thunder_disk(self, server, image_id):
        info = self.connection_info(server)
        self.assertEqual('thunder', info['driver_volume_type'])
        self.assertEqual(server['id'], info['data']['instance_id'])
        self.assertEqual(image_id, info['data']['image_id'])
        self.assertTrue(os.path.isfile(info['data']['path']))
        disk = self.domain_disk(server)
        self.assertEqual('file', disk.get('type'))
        self.assertEqual(info['data']['path'],
                         disk.find('source').get('file'))
        self.assertEqual('qcow2', disk.find('driver').get('type'))
        backing = disk.find('backingStore/source')
        self.assertEqual('nbd', backing.get('protocol'))
        self.assertEqual(info['data']['backing']['socket'],
                         backing.find('host').get('socket'))
        return info

    # -- tests -------------------------------------------------------------
    def test_image_origin_servers(self):
        """Two servers from one Glance image in one request: one template,
        two snapshots; hard reboot keeps a disk, delete releases it."""
        servers = self.create({'source_type': 'image', 'uuid': IMAGE,
                               'destination_type': 'volume',
                               'volume_size': 1, 'volume_type': 'thunder',
                               'delete_on_termination': True}, min_count=2)
        infos = [self.assert_thunder_disk(s, IMAGE) for s in servers]
        status = self.agent_status()
        self.assertEqual([IMAGE], [t['image_id'] for t in status['templates']])
        self.assertEqual({s['id'] for s in servers}, self.snapshot_ids())
        # No Cinder volume was created for them.
        self.assertEqual(set(), set(self.cinder.volumes) - {GOLDEN_VOLUME})

        self._reboot_server(servers[0], hard=True)
        self.assertEqual(infos[0], self.connection_info(servers[0]))
        self.assertTrue(os.path.isfile(infos[0]['data']['path']))
        self.assertIn(servers[0]['id'], self.snapshot_ids())

        for server, info in zip(servers, infos):
            self._delete_server(server)
            self.assertNotIn(server['id'], self.snapshot_ids())
            self.assertFalse(os.path.exists(info['data']['path']))

    def test_golden_volume_origin_server(self):
        if not self.iscsi:
            self.skipTest('no iSCSI target for the golden volume')
        server, = self.create({'source_type': 'volume',
                               'uuid': GOLDEN_VOLUME,
                               'destination_type': 'volume',
                               'delete_on_termination': False})
        info = self.assert_thunder_disk(server, GOLDEN_VOLUME)
        self.assertEqual(GOLDEN_VOLUME, info['serial'])
        template, = self.agent_status()['templates']
        self.assertEqual('iscsi', template['origin']['driver_volume_type'])
        self.assertEqual(self.iscsi['portal'],
                         template['origin']['data']['target_portal'])
        self.assertEqual(1, len(self.cinder.volume_to_attachment[
            GOLDEN_VOLUME]))

        self._delete_server(server)
        self.assertNotIn(server['id'], self.snapshot_ids())
        # The Cinder attachment is gone, the golden volume kept.
        self.assertEqual({}, self.cinder.volume_to_attachment[GOLDEN_VOLUME])
        self.assertIn(GOLDEN_VOLUME, self.cinder.volumes)

    def test_unmarked_block_device_is_novas(self):
        """A volume type that is not thunder: Nova's usual path, a Cinder
        volume is created and attached; the agent is not involved."""
        server, = self.create({'source_type': 'image', 'uuid': IMAGE,
                               'destination_type': 'volume',
                               'volume_size': 1, 'volume_type': 'lvm-1',
                               'delete_on_termination': True})
        info = self.connection_info(server)
        self.assertEqual('fake', info['driver_volume_type'])
        created = set(self.cinder.volumes) - {GOLDEN_VOLUME}
        self.assertEqual({self.root_bdm(server).volume_id}, created)
        self.assertEqual(set(), self.snapshot_ids())
        self._delete_server(server)

    def test_failed_spawn_releases_the_snapshot(self):
        """libvirt fails after the disk was prepared: Nova's cleanup of the
        failed build (destroy with destroy_disks) releases the snapshot."""
        prepared = []
        create = block_device.ThunderImageBlockDevice.attach

        def attach(device, *args, **kwargs):
            create(device, *args, **kwargs)
            prepared.append(device['connection_info'])

        self.stub_out('nova_thunder.block_device.ThunderImageBlockDevice.'
                      'attach', attach)
        # One host: fail the build there instead of rescheduling.
        self.flags(max_attempts=1, group='scheduler')
        self.stub_out('nova.virt.libvirt.driver.LibvirtDriver.'
                      '_create_guest_with_network',
                      mock.Mock(side_effect=test.TestingException('boom')))
        server, = self.create({'source_type': 'image', 'uuid': IMAGE,
                               'destination_type': 'volume',
                               'volume_size': 1, 'volume_type': 'thunder',
                               'delete_on_termination': True},
                              expected='ERROR')
        self.assertEqual(1, len(prepared))
        self.assertEqual(server['id'], prepared[0]['data']['instance_id'])
        self.assertFalse(os.path.exists(prepared[0]['data']['path']))
        self.assertEqual(set(), self.snapshot_ids())

    def test_bad_image_fails_cleanly(self):
        server, = self.create({'source_type': 'image', 'uuid': BAD_IMAGE,
                               'destination_type': 'volume',
                               'volume_size': 1, 'volume_type': 'thunder',
                               'delete_on_termination': True},
                              expected='ERROR')
        self.assertIn("disk_format 'vmdk' is not one of raw, qcow2",
                      server['fault']['message'])
        self.assertEqual(set(), self.snapshot_ids())
        self.assertEqual([], self.agent_status()['templates'])
