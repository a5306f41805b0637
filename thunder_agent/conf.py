"""Configuration options of the thunder agent.

All options of the agent live here so that ``oslo-config-generator`` can
produce ``etc/thunder-agent.conf.sample`` from :func:`list_opts`.
"""

import socket

from oslo_config import cfg

CONF = cfg.CONF

default_opts = [
    cfg.HostAddressOpt(
        'host', default=socket.gethostname(), sample_default='<hostname>',
        help='Name of this compute host. The agent listens on the RPC '
             'topic with this name as server; it must match the host name '
             'nova-compute uses.'),
]

agent_group = cfg.OptGroup('agent', title='Thunder agent')
agent_opts = [
    cfg.StrOpt('state_path', default='/var/lib/thunder-agent',
               help='Directory holding the durable state of the agent: '
                    'template caches, snapshot overlays and their records. '
                    'Everything here survives agent restarts.'),
    cfg.StrOpt('run_path', default='/run/thunder-agent',
               help='Directory for sockets and pid files of data-plane '
                    'daemons. Keep the path short: unix socket paths are '
                    'limited to 107 bytes.'),
    cfg.StrOpt('backend', default='qemu',
               help='Data-plane backend, a name in the '
                    '"thunder_agent.backends" entry point namespace: '
                    '"qemu" (qemu-storage-daemon, NBD, qcow2) or "kernel" '
                    '(iSCSI, device-mapper).'),
    cfg.StrOpt('topic', default='thunder-agent',
               help='RPC topic the agents listen on.'),
    cfg.ListOpt('file_origin_dirs', default=[],
                help='Directories from which local image files may be used '
                     'as origins ("file" origins). Empty: file origins are '
                     'refused.'),
    cfg.IntOpt('housekeeping_interval', default=10, min=1,
               help='Seconds between housekeeping runs: data-plane '
                    'supervision, cache flushes, garbage collection.'),
    cfg.IntOpt('template_grace_period', default=600, min=0,
               help='Seconds a template may stay without any snapshot or '
                    'child before garbage collection removes it.'),
]

cache_group = cfg.OptGroup('cache', title='Local template cache')
cache_opts = [
    cfg.IntOpt('size_limit_mb', default=20480, min=1,
               help='Upper bound in MiB for the disk space used by template '
                    'caches on this host. When a new template is needed and '
                    'the limit is reached, idle templates are evicted, '
                    'least recently used first; templates with snapshots or '
                    'children are never evicted.'),
    cfg.IntOpt('cluster_size', default=65536,
               help='Cache granularity in bytes (qcow2 cluster size of a '
                    'cache file): a read miss fetches whole clusters. A '
                    'power of two between 512 and 2097152.'),
    cfg.IntOpt('flush_interval', default=5, min=1,
               help='Seconds between flushes of cache metadata to disk. '
                    'Blocks cached since the last flush are fetched again '
                    'after a crash of the data plane (never wrong data).'),
]

qemu_group = cfg.OptGroup('qemu', title='qemu data-plane backend')
qemu_opts = [
    cfg.StrOpt('storage_daemon', default='qemu-storage-daemon',
               help='qemu-storage-daemon executable.'),
    cfg.StrOpt('qemu_img', default='qemu-img', help='qemu-img executable.'),
    cfg.IntOpt('reconnect_delay', default=300, min=0,
               help='Seconds an NBD client (a template towards its source, '
                    'a VM towards its template) keeps requests queued while '
                    'it reconnects before failing them.'),
    cfg.IntOpt('start_timeout', default=30, min=1,
               help='Seconds to wait for a qemu-storage-daemon to come up.'),
]


def register_opts(conf=CONF):
    conf.register_opts(default_opts)
    for group, opts in ((agent_group, agent_opts), (cache_group, cache_opts),
                        (qemu_group, qemu_opts)):
        conf.register_group(group)
        conf.register_opts(opts, group=group)


def list_opts():
    return [
        ('DEFAULT', default_opts),
        (agent_group, agent_opts),
        (cache_group, cache_opts),
        (qemu_group, qemu_opts),
    ]


register_opts()
