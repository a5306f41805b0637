"""Cinder and Glance data in the shapes Nova hands them around.

Recorded from a devstack (Cinder LVM backend with tgt, Glance file store)
and passed through Nova's translations (``nova.volume.cinder`` and
``nova.image.glance``); ids and secrets replaced.
"""

import copy

GOLDEN_VOLUME_ID = '8d7c1e52-5f0a-4d7e-9b8a-2c6e33c1d0f4'
IMAGE_ID = '3a1f6d0e-8c2b-4b5e-a7a4-6a0f5e9b2c11'
ATTACHMENT_ID = 'f2b9d9c4-1c1e-4b3f-9a55-0d6c8e7a4b21'

# nova.volume.cinder.API.get() of a thunder "golden" volume.
GOLDEN_VOLUME = {
    'id': GOLDEN_VOLUME_ID,
    'status': 'in-use',
    'size': 1,
    'availability_zone': 'nova',
    'created_at': '2025-11-20T09:12:44.000000',
    'attach_time': '',
    'mountpoint': '',
    'multiattach': True,
    'attachments': {},
    'attach_status': 'attached',
    'display_name': 'cirros-golden',
    'display_description': None,
    'volume_type_id': 'thunder',
    'snapshot_id': None,
    'bootable': True,
    'volume_metadata': {},
    'volume_image_metadata': {
        'image_id': IMAGE_ID, 'image_name': 'cirros-0.6.2-x86_64-disk',
        'disk_format': 'raw', 'container_format': 'bare',
        'min_ram': '0', 'min_disk': '0', 'size': '117440512',
        'checksum': 'c8fc807773e5354afe61636071771906'},
    'shared_targets': True,
    'service_uuid': '4c7f1d1e-3f0c-4f4a-9f0e-7e1e8bd1a9a0',
    'migration_status': None,
}

# attachment_update(...)['connection_info'] for that volume (LVM + tgt).
CINDER_ISCSI_CONNECTION_INFO = {
    'driver_volume_type': 'iscsi',
    'data': {
        'target_discovered': False,
        'target_portal': '192.168.122.10:3260',
        'target_iqn': 'iqn.2010-10.org.openstack:volume-' + GOLDEN_VOLUME_ID,
        'target_lun': 1,
        'volume_id': GOLDEN_VOLUME_ID,
        'auth_method': 'CHAP',
        'auth_username': 'Vh3sPqLk9ZbT2mWx',
        'auth_password': 'nQ8rTf2LpXw6YbKc',
        'encrypted': False,
        'qos_specs': None,
        'access_mode': 'rw',
        'cacheable': False,
        'discard': False,
        'attachment_id': ATTACHMENT_ID,
    },
}

# nova.image.glance.API.get() of a raw image marked for thunder.
GLANCE_IMAGE = {
    'id': IMAGE_ID,
    'name': 'cirros-0.6.2-x86_64-disk',
    'status': 'active',
    'disk_format': 'raw',
    'container_format': 'bare',
    'size': 117440512,
    'min_ram': 0,
    'min_disk': 0,
    'checksum': 'c8fc807773e5354afe61636071771906',
    'owner': '9f2ad3c0b8e64e0c8a3b3f0bdb6d7a11',
    'is_public': True,
    'created_at': '2025-11-20T09:02:11Z',
    'updated_at': '2025-11-20T09:02:13Z',
    'deleted': False,
    'deleted_at': None,
    'properties': {
        'os_hash_algo': 'sha512',
        'os_hidden': False,
        'hw_disk_bus': 'virtio',
        'thunder_origin': 'nbd://192.168.122.10:10809/{image_id}',
    },
}


def volume(**changes):
    return dict(copy.deepcopy(GOLDEN_VOLUME), **changes)


def iscsi_connection_info(**data_changes):
    info = copy.deepcopy(CINDER_ISCSI_CONNECTION_INFO)
    info['data'].update(data_changes)
    return info


def image(properties=None, **changes):
    img = dict(copy.deepcopy(GLANCE_IMAGE), **changes)
    if properties is not None:
        img['properties'] = properties
    return img
