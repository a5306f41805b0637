"""The ``[thunder]`` options of nova.conf (nova-cpu.conf on a compute host).

``oslo-config-generator`` produces ``etc/nova-thunder.conf.sample`` from
:func:`list_opts`. Nothing is registered on import:
:func:`nova_thunder.wiring.apply` (run by ``nova-compute-thunder``)
registers them on Nova's CONF.
"""

from oslo_config import cfg

thunder_group = cfg.OptGroup(
    'thunder', title='Thunder block devices',
    help='Fast mass boot: block devices whose disk is a copy-on-write '
         'snapshot over a per-host, on-demand, cached and relayed template '
         'prepared by the local thunder agent.')

thunder_opts = [
    cfg.BoolOpt('enabled', default=True,
                help='Prepare thunder disks for new thunder-marked block '
                     'devices on this host. When false, such block devices '
                     'fail to attach with a clear error instead of being '
                     'attached the usual way; disks that already exist keep '
                     'working.'),
    cfg.StrOpt('topic', default='thunder-agent',
               help='RPC topic of the thunder agents; must equal the '
                    'agents\' [agent] topic.'),
    cfg.StrOpt('control_exchange', default='openstack',
               help='oslo.messaging exchange the thunder agents listen on; '
                    'must equal the agents\' [DEFAULT] control_exchange. '
                    'Given explicitly because nova-compute\'s own '
                    'control_exchange is "nova".'),
    cfg.StrOpt('transport_url', secret=True,
               sample_default='rabbit://thunder:secret@controller:5672/',
               help='oslo.messaging URL of the broker the thunder agents '
                    'listen on. Unset: the [DEFAULT] transport_url of this '
                    'service.'),
    cfg.IntOpt('timeout', default=300, min=1,
               help='Seconds nova-compute waits for the agent to prepare a '
                    'disk (template creation included) or to release one.'),
    cfg.StrOpt('backend', default='qemu',
               choices=[('qemu', 'qemu-storage-daemon templates; the disk is '
                                 'a qcow2 overlay over an NBD export'),
                        ('kernel', 'iSCSI, block cache and device-mapper; '
                                   'the disk is a block device')],
               help='Data-plane backend of the local agent. A disk of '
                    'another backend returned for a new block device is '
                    'refused (and released) before libvirt sees it, so a '
                    'misconfigured host fails early.'),
    cfg.StrOpt('agent_host', sample_default='<[DEFAULT] host>',
               help='Host name the local agent serves under (its [DEFAULT] '
                    'host). Unset: this service\'s [DEFAULT] host.'),
    cfg.ListOpt('volume_types', default=['thunder'],
                help='Names of the Cinder volume types that mark thunder '
                     'block devices: a volume of such a type (source_type '
                     'volume) becomes the origin of a template, and an '
                     'image-to-volume block device naming such a type '
                     '(source_type image, destination_type volume, '
                     'volume_type) boots from a template of the Glance '
                     'image instead of a new Cinder volume. Create the '
                     'types with the extra specs thunder:enabled=\'<is> '
                     'True\' and multiattach=\'<is> True\'.'),
    cfg.StrOpt('image_origin',
               sample_default='nbd://origin.example.org:10809/{image_id}',
               help='Where agents read Glance images that serve as origins, '
                    'as a URL pattern with the placeholder {image_id}: '
                    '"nbd://HOST:PORT/EXPORT", "nbd+unix:///EXPORT?socket='
                    'PATH" or "file:///DIR/{image_id}". The agents must '
                    'allow it ([agent] nbd_origin_networks and '
                    'nbd_origin_ports, origin_socket_dirs or '
                    'file_origin_dirs). Unset, and no store_image_origins '
                    'entry nor trusted thunder_origin property for the '
                    'image: image-backed thunder block devices are '
                    'refused.'),
    cfg.DictOpt('store_image_origins', default={},
                sample_default='fast:file:///srv/glance/fast/{image_id},'
                               'ceph:nbd://10.0.5.1:10809/{image_id}',
                help='With Glance multi-store: an image_origin pattern per '
                     'Glance store id ("STORE:PATTERN,..."). An image is '
                     'read where the first of its stores that has an entry '
                     'says; an image in none of them where image_origin '
                     'says.'),
    cfg.ListOpt('trusted_image_owners', default=[],
                help='Projects (ids) whose images may name their own origin '
                     'with the image property "thunder_origin" (a URL of '
                     'the image_origin forms). Any other owner\'s property '
                     'is ignored, logged, and the image read where '
                     'store_image_origins or image_origin says: any tenant '
                     'may set properties on its images, and the agent reads '
                     'origins as root. "*" trusts every owner: only with '
                     'Glance property protections that let administrators '
                     'alone set thunder_origin. Empty: the property is '
                     'never used.'),
    cfg.StrOpt('agent_state_path', default='/var/lib/thunder-agent',
               help='The local agent\'s [agent] state_path. A qemu disk '
                    'is accepted from the agent only as the overlay '
                    '<agent_state_path>/snapshots/<instance uuid>/'
                    'overlay.qcow2, so that an answer forged on the message '
                    'bus cannot give the guest another host file.'),
    cfg.StrOpt('agent_run_path', default='/run/thunder-agent',
               help='The local agent\'s [agent] run_path. A qemu disk\'s '
                    'backing is accepted only as the template\'s NBD '
                    'export on <agent_run_path>/<image id>.nbd, or on '
                    'agent_relay_address.'),
    cfg.HostAddressOpt('agent_relay_address', default='127.0.0.1',
                       help='The local agent\'s [relay] listen_address: a '
                            'relaying template exports over TCP there, and '
                            'its disks\' backing is accepted there only, on '
                            'a port of agent_relay_port_min..max.'),
    cfg.PortOpt('agent_relay_port_min', default=10810,
                help='The local agent\'s [relay] port_min.'),
    cfg.PortOpt('agent_relay_port_max', default=10873,
                help='The local agent\'s [relay] port_max.'),
    cfg.StrOpt('agent_device_prefix', default='thunder',
               regex=r'^[a-z][a-z0-9-]{0,31}$',
               help='The local agent\'s [kernel] device_prefix. A kernel '
                    'disk is accepted only as /dev/mapper/'
                    '<agent_device_prefix>-snap-<instance uuid>.'),
    cfg.BoolOpt('allow_untested_nova', default=False,
                help='Start even when the installed Nova release is not one '
                     'this nova-thunder release was tested with. The check '
                     'of the Nova internals the wiring relies on still '
                     'applies and cannot be turned off.'),
]


def register_opts(conf):
    conf.register_group(thunder_group)
    conf.register_opts(thunder_opts, group=thunder_group)


def list_opts():
    return [(thunder_group, thunder_opts)]
