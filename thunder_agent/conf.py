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


coordinator_group = cfg.OptGroup('coordinator', title='Relay tree coordinator')
coordinator_opts = [
    cfg.StrOpt('topic', default='thunder-coordinator',
               help='RPC topic of the coordinator. Agents call it to join '
                    'relay trees and to send heartbeats; run one '
                    'coordinator per topic (it keeps the trees in memory).'),
    cfg.StrOpt('policy', default='kary',
               help='Tree policy, a name in the '
                    '"thunder_agent.tree_policies" entry point namespace. '
                    '"kary": k-ary breadth-first fill under the origin.'),
    cfg.IntOpt('fan_out', default=4, min=1, max=1024,
               help='Children per node (and under the origin) that the '
                    'tree policy aims for: the "k" of the k-ary tree. Trees '
                    'grow log_k(hosts) deep; a larger k loads parents more.'),
    cfg.IntOpt('heartbeat_interval', default=10, min=1,
               help='Seconds between two heartbeats of an agent. The '
                    'heartbeat lists the templates of the agent and their '
                    'parents; it is how the coordinator rebuilds its trees '
                    'after a restart.'),
    cfg.IntOpt('node_timeout', default=35, min=2,
               help='Seconds without a heartbeat after which the '
                    'coordinator drops a node from every tree and gives its '
                    'children new parents. Must be well above '
                    'heartbeat_interval.'),
    cfg.IntOpt('failure_quarantine', default=30, min=0,
               help='Seconds during which a node that a child reported as a '
                    'failed parent gets no new children.'),
    cfg.IntOpt('rpc_timeout', default=30, min=1,
               help='Seconds an agent waits for an answer of the '
                    'coordinator.'),
]


def register_opts(conf=CONF):
    # Inside nova-compute (which imports the RPC client) Nova already owns
    # [DEFAULT] host, with the same meaning; registering ours would clash.
    if 'host' not in conf:
        conf.register_opts(default_opts)
    for group, opts in ((agent_group, agent_opts), (cache_group, cache_opts),
                        (qemu_group, qemu_opts),
                        (coordinator_group, coordinator_opts)):
        conf.register_group(group)
        conf.register_opts(opts, group=group)


def list_opts():
    return [
        ('DEFAULT', default_opts),
        (agent_group, agent_opts),
        (cache_group, cache_opts),
        (qemu_group, qemu_opts),
        (coordinator_group, coordinator_opts),
    ]


register_opts()
