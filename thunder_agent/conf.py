"""Configuration options of the thunder agent and the coordinator.

Nothing is registered when this module is imported: the console scripts in
:mod:`thunder_agent.cmd` call :func:`register_opts` on the configuration
they parse (as ovn-bgp-agent does), so importing the RPC client API inside
nova-compute adds no option to Nova's configuration. ``oslo-config-generator``
produces ``etc/thunder-agent.conf.sample`` from :func:`list_opts`.
"""

import ipaddress
import socket

from oslo_config import cfg
from oslo_config import types

from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent.rpc import api as agent_api


class Network(types.ConfigType):
    """An IPv4 or IPv6 network in CIDR notation (host bits refused, so
    that ``10.0.0.5/24`` is not read as ``10.0.0.0/24`` by mistake)."""

    def __init__(self):
        super().__init__(type_name='CIDR value')

    def __call__(self, value):
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return value
        return ipaddress.ip_network(str(value).strip())

    def _formatter(self, value):
        return str(value)


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
                    'Everything here survives agent restarts; records the '
                    'agent cannot read are moved to lost+found/ below it, '
                    'never deleted.'),
    cfg.StrOpt('run_path', default='/run/thunder-agent',
               help='Directory for sockets and pid files of data-plane '
                    'daemons. Keep the path short: unix socket paths are '
                    'limited to 107 bytes.'),
    cfg.StrOpt('backend', default='qemu',
               help='Data-plane driver, a name in the '
                    '"thunder_agent.drivers" entry point namespace: '
                    '"qemu" (qemu-storage-daemon, NBD, qcow2) or "kernel" '
                    '(iSCSI, bcache, device-mapper).'),
    cfg.StrOpt('topic', default=agent_api.TOPIC,
               help='RPC topic the agents listen on.'),
    cfg.ListOpt('file_origin_dirs', default=[],
                help='Directories holding image files that may be origins '
                     '("file" origins), e.g. Glance\'s file store. An '
                     'origin must be exactly "<dir>/<image id>": a regular '
                     'file, not a symlink, in a directory no other user may '
                     'write to. Empty: file origins are refused.'),
    cfg.ListOpt('origin_socket_dirs', default=[],
                help='Directories holding the unix sockets of NBD origin '
                     'servers ("nbd+unix" origins, e.g. thunder-origin). '
                     'An origin\'s socket must sit directly in one of them, '
                     'be a socket (not a symlink) and not be in or under '
                     'this agent\'s run_path, whose sockets are the '
                     'templates of other images. Empty: socket origins are '
                     'refused.'),
    cfg.ListOpt('nbd_origin_networks', default=[], item_type=Network(),
                help='Networks, in CIDR notation, of the NBD origin servers '
                     'this agent may connect to ("nbd" origins over TCP). '
                     'The host of such an origin must be an IP address '
                     'literal inside one of them: host names are refused, '
                     'never resolved, and so are IPv6 scope ids, '
                     'IPv4-mapped IPv6 addresses and unspecified or '
                     'multicast addresses. Empty: TCP NBD origins are '
                     'refused.'),
    cfg.Opt('nbd_origin_ports', type=types.Range(min=1, max=65535),
            default='10809',
            help='TCP port, or range of ports "FIRST-LAST", of the NBD '
                 'origin servers (10809 is NBD\'s and thunder-origin\'s '
                 'default).'),
    cfg.IntOpt('housekeeping_interval', default=10, min=1,
               help='Seconds between housekeeping runs: data-plane '
                    'supervision (a template whose daemon or forwarder died '
                    'is rebuilt from its cache), garbage collection of idle '
                    'templates and eviction down to [cache] size_limit_mb. '
                    'Cache flushes, heartbeats and parent probes have their '
                    'own intervals.'),
    cfg.IntOpt('template_grace_period', default=600, min=0,
               help='Seconds a template may stay without any snapshot or '
                    'child before garbage collection removes it.'),
    cfg.IntOpt('prepare_timeout', default=240, min=10,
               help='Seconds a prepare request may take, waits for another '
                    'request building the same template included. Every '
                    'step has its own, shorter deadline (origin probe, '
                    'coordinator call, parent wait, daemon start); this '
                    'bounds the sum. Keep it below nova.conf [thunder] '
                    'timeout so that Nova gets the agent\'s error rather '
                    'than a timeout.'),
    cfg.IntOpt('background_workers', default=4, min=1, max=64,
               help='Threads that repair data planes and switch templates '
                    'to new parents in the background, so that one slow '
                    'template (an iSCSI login to a dead parent) delays '
                    'neither heartbeats nor the others.'),
]

cache_group = cfg.OptGroup('cache', title='Local template cache')
cache_opts = [
    cfg.IntOpt('size_limit_mb', default=20480, min=1,
               help='Upper bound in MiB for the disk space template caches '
                    'on this host may take, each counted at the size it may '
                    'grow to (the image\'s virtual size and the cache\'s '
                    'metadata: any reader of the template, a VM, a child '
                    'node or an NBD_CMD_CACHE request, may make it cache '
                    'the whole image), not at what it holds now. A new '
                    'template that would take the sum over the limit '
                    'evicts idle templates, least recently used first, and '
                    'is refused (CacheLimitExceeded) when none is left; '
                    'templates with snapshots or children are never '
                    'evicted. The default, 20 GiB, holds nine images of '
                    '2 GiB virtual size with the qemu driver (each cache '
                    '2 GiB plus 0.02 %), four with the kernel driver (each '
                    'counted at twice the image plus 1 GiB).'),
    cfg.IntOpt('reserve_mb', default=1024, min=0,
               help='MiB of the file system under [agent] state_path that '
                    'template caches never take: a new template is admitted '
                    'only when its cache at full size, plus what the other '
                    'caches may still grow by, fits in the free space '
                    '(statvfs f_bavail) minus this reserve (or '
                    'reserve_percent, whichever is larger); otherwise idle '
                    'templates are evicted, and then it is refused '
                    '(InsufficientDiskSpace). So a cache never fills the '
                    'disk, where a copy-on-read fill that cannot be written '
                    'fails the VM\'s read. The reserve is what the rest of '
                    'the state needs: records (under 4 KiB each, 4 MiB for '
                    '1,000 templates and snapshots) and, above all, VM '
                    'writes into snapshot overlays, which are not counted '
                    'ahead. 1 GiB leaves ten VMs 100 MiB of writes each (a '
                    'rough figure for a first boot: logs, cloud-init, '
                    'package caches; measure your images).'),
    cfg.IntOpt('reserve_percent', default=2, min=0, max=50,
               help='The same reserve as a share of the size of the file '
                    'system under [agent] state_path; the larger of the two '
                    'applies. Overlays grow with the number of VMs, which '
                    'grows with the disk: 2 % of a 1 TiB disk is 20 GiB. '
                    'The file system\'s own root reserve (5 % on ext4) is '
                    'not counted in: free space is what unprivileged users '
                    'may take.'),
    cfg.IntOpt('cluster_size', default=65536,
               help='Cache granularity in bytes (qcow2 cluster size of a '
                    'cache file): a read miss fetches whole clusters. A '
                    'power of two between 512 and 2097152.'),
    cfg.IntOpt('flush_interval', default=5, min=1,
               help='Seconds between flushes of cache metadata to disk. '
                    'After a crash of a template daemon, blocks cached '
                    'since the last flush are fetched again (their qcow2 '
                    'mappings were in its memory only). A power cut or host '
                    'crash can leave a cluster mapped whose data never '
                    'reached the disk; so a cache whose daemon the agent did '
                    'not stop cleanly (flushed, quit, marked in the template '
                    'directory) is verified before it serves: qemu-img '
                    'check -r all, then every cluster it holds hashed '
                    'against the image\'s manifest from the origin, those '
                    'that differ dropped and fetched again; without a '
                    'manifest the whole cache is discarded. This costs a '
                    'read of the cached bytes at the next build (a 32 MiB '
                    'cache: 0.1 s). A shorter interval loses fewer fills to '
                    'a crash; it does not make a power cut safe without '
                    'that check.'),
]

qemu_group = cfg.OptGroup('qemu', title='qemu data-plane driver')
qemu_opts = [
    cfg.StrOpt('storage_daemon', default='qemu-storage-daemon',
               help='qemu-storage-daemon executable.'),
    cfg.StrOpt('qemu_img', default='qemu-img', help='qemu-img executable.'),
    cfg.IntOpt('reconnect_delay', default=300, min=0,
               help='Seconds an NBD client (a template towards its source, '
                    'a VM towards its template) keeps requests queued while '
                    'it reconnects before failing them.'),
    cfg.IntOpt('open_timeout', default=10, min=1,
               help='Seconds a new template\'s NBD client may take to '
                    'connect to its source. The agent checks that the '
                    'source serves before it builds the graph, so this only '
                    'covers a source that dies in between; a long value '
                    'would hold the daemon\'s monitor that long.'),
    cfg.IntOpt('start_timeout', default=30, min=1,
               help='Seconds to wait for a qemu-storage-daemon to come up, '
                    'and for one of its monitor commands to answer.'),
    cfg.IntOpt('command_timeout', default=60, min=1,
               help='Seconds a qemu-img run (origin probe, cache or overlay '
                    'creation, cache map) may take.'),
    cfg.IntOpt('flush_timeout', default=10, min=1,
               help='Seconds a flush of a template\'s cache may take before '
                    'it is given up until the next [cache] flush_interval.'),
    cfg.IntOpt('local_connections', default=128, min=4, max=4096,
               help='NBD connections a template\'s unix socket takes at '
                    'once from local readers: one per VM of the image on '
                    'this host, and up to 3 of the agent (flush, prefetch, '
                    'stats). The template daemon\'s QEMU max-connections is '
                    'this plus relay_connections for a relaying template; '
                    'a reader beyond it waits unanswered until one leaves. '
                    'Only processes that can open [agent] run_path reach '
                    'the socket.'),
    cfg.IntOpt('relay_connections', default=0, min=0, max=1024,
               help='TCP connections a relaying template\'s relay listener '
                    '(children only: local readers use the unix socket) '
                    'serves at once; one more waits in the kernel\'s accept '
                    'queue until one leaves, and a child whose parent is '
                    'full reads from the origin after [relay] '
                    'parent_ready_timeout. 0: twice [coordinator] fan_out '
                    'plus 4 (12 with fan_out 4): each child\'s connection, '
                    'one more per child for its readiness probes and for a '
                    'reconnection while the old connection is not yet '
                    'closed, and 4 to spare. Anyone who can reach the port '
                    'from [relay] peer_networks can hold these; TLS with '
                    'client authorization is what keeps strangers out.'),
]


prefetch_group = cfg.OptGroup('prefetch', title='Prefetching templates')
prefetch_opts = [
    cfg.StrOpt('trace_dir', sample_default='<[agent] state_path>/traces',
               help='Directory of boot traces, one file "<image id>.trace" '
                    'per image (see thunder-trace). When a template is '
                    'created for an image with a trace, the agent fetches '
                    'the trace\'s blocks ahead of the VMs, in trace order.'),
    cfg.IntOpt('concurrency', default=4, min=1, max=64,
               help='Prefetch requests in flight per template.'),
    cfg.IntOpt('full_rate_mb', default=0, min=0,
               help='After creating a template (and its trace prefetch), '
                    'stream the rest of the image into the cache at this '
                    'many MiB/s in the background. 0: only on request '
                    '(thunder-admin prefetch).'),
    cfg.IntOpt('max_rate_mb', default=100, min=1,
               help='Cap in MiB/s on every full prefetch of this agent, '
                    'whatever rate full_rate_mb or a request asks for: a '
                    'faster request is clamped to it (its status shows the '
                    'rate it runs at). A full prefetch fetches the whole '
                    'image from the template\'s source; 100 MiB/s leaves a '
                    '1 Gbit/s link about a fifth for booting VMs.'),
]

relay_group = cfg.OptGroup('relay', title='Relay tree (agent side)')
relay_opts = [
    cfg.BoolOpt('enabled', default=False,
                help='Join the per-image relay trees of the coordinator: a '
                     'template fetches misses from the parent the '
                     'coordinator assigns (or the origin) and serves its '
                     'children. Needs an export address reachable from the '
                     'other hosts ([relay] listen_address for the qemu '
                     'driver, [kernel] export_address for the kernel '
                     'driver). The qemu driver relays NBD origins that '
                     'export the image under its id, the kernel driver '
                     'iSCSI origins; file origins are always read '
                     'directly.'),
    cfg.HostAddressOpt('listen_address', default='127.0.0.1',
                       help='Address the qemu driver\'s template exports '
                            'listen on when relay is enabled (children and '
                            'local VMs connect here). Use the address of the '
                            'storage network.'),
    cfg.PortOpt('port_min', default=10810,
                help='First TCP port for template exports (one per image).'),
    cfg.PortOpt('port_max', default=10873,
                help='Last TCP port for template exports.'),
    cfg.ListOpt('peer_networks', default=[], item_type=Network(),
                help='Networks, in CIDR notation, of the other hosts\' '
                     'relay exports. A parent the coordinator names must '
                     'be an IP address literal inside one of them (and '
                     'its port in port_min..port_max, its export the image '
                     'id), else it is refused and the template reads from '
                     'the origin. The qemu driver\'s relay listener also '
                     'accepts children from there only (when the networks '
                     'of listen_address\'s family are one network). Empty: '
                     'the network listen_address is configured on, as the '
                     'host\'s interface has it (10.0.0.0/24 for 10.0.0.5/24, '
                     '127.0.0.0/8 for the default 127.0.0.1); no parent is '
                     'accepted while listen_address is on no interface.'),
    cfg.IntOpt('rate_limit_mbit', default=0, min=0,
               help='Cap, in Mbit/s, on relay traffic this node sends to '
                    'its children (tc HTB on [relay] interface, matching the '
                    'export ports), so tenants are not starved. 0: no cap.'),
    cfg.StrOpt('interface', default='eth0',
               help='Interface relay traffic leaves by, for the rate cap.'),
    cfg.IntOpt('join_timeout', default=5, min=1,
               help='Seconds a new template waits for the coordinator to '
                    'place it in the tree. Without an answer it reads from '
                    'the origin, and the next heartbeat enters the tree; '
                    'until a heartbeat succeeds again, further new '
                    'templates do not wait for the coordinator at all.'),
    cfg.IntOpt('parent_probe_interval', default=5, min=1,
               help='Seconds between two probes of every relaying '
                    'template\'s parent (one connection attempt to each '
                    'distinct parent, in parallel).'),
    cfg.IntOpt('parent_probe_timeout', default=2, min=1,
               help='Seconds a connection attempt to the parent may take '
                    'before the parent counts as unreachable.'),
    cfg.IntOpt('parent_failures', default=2, min=1,
               help='Consecutive failed probes after which the parent is '
                    'reported as failed to the coordinator and the template '
                    'moved to the parent the coordinator answers with.'),
    cfg.FloatOpt('parent_ready_timeout', default=30.0, min=0,
                 help='Seconds a new template waits for its parent to '
                      'serve. A parent that joined the tree a moment ago '
                      'may still be building its template; polling here '
                      'lets each tree level start as soon as the one above '
                      'serves. A parent that does not serve within this '
                      'time is reported as failed and the template reads '
                      'from the origin instead. 0: do not wait.'),
    cfg.IntOpt('parent_wait', default=30, min=1, max=3600,
               help='Seconds the verifier of a relaying template retries '
                    'a parent that does not answer (refused, including a '
                    'TLS authorization refusal while the parent has not '
                    'learnt of this child yet, or dropped) with backoff, '
                    'reads blocking, before it reads from the origin '
                    'instead: long enough for a re-parent to reach the '
                    'new parent (a probe round of parent_probe_interval '
                    'and a coordinator answer), short enough that a dead '
                    'parent stalls a VM\'s read for no longer.'),
]

coordinator_group = cfg.OptGroup('coordinator', title='Relay tree coordinator')
coordinator_opts = [
    cfg.StrOpt('topic', default=coordinator_rpc.TOPIC,
               help='RPC topic of the coordinator. Agents call it to join '
                    'relay trees and to send heartbeats; run one '
                    'coordinator per topic (it keeps the trees in memory).'),
    cfg.StrOpt('policy', default='kary',
               help='Tree policy, a name in the '
                    '"thunder_agent.tree_policies" entry point namespace. '
                    '"kary": k-ary breadth-first fill under the origin.'),
    cfg.IntOpt('fan_out', default=4, min=1, max=1024,
               help='Children per node that the tree policy aims for: the '
                    '"k" of the k-ary tree. Trees grow log_k(hosts) deep; a '
                    'larger k loads parents more.'),
    cfg.IntOpt('origin_fan_out', default=1, min=1, max=1024,
               help='Children the origin serves directly. 1 makes the '
                    'origin send each block once, whatever the number of '
                    'hosts; raise it only when the origin\'s link is much '
                    'faster than the hosts\' (every child costs the origin '
                    'one more copy of the working set).'),
    cfg.IntOpt('heartbeat_interval', default=10, min=1,
               help='Seconds between two heartbeats of an agent (each one '
                    'drawn at random within 10 % of this, and the first '
                    'within one interval of the start, so that hosts '
                    'restarted together do not call together). The '
                    'heartbeat lists the templates of the agent and their '
                    'parents; its answer gives each template\'s parents and '
                    'children. It is how the coordinator rebuilds its trees '
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
                    'coordinator to a heartbeat, a leave or a failure '
                    'report ([relay] join_timeout bounds joins).'),
    cfg.StrOpt('ca_file',
               help='PEM file of the CA(s) whose certificates the '
                    'coordinator accepts on signed calls: a call is taken '
                    'only from a certificate of this CA, valid now, whose '
                    'common name is the node it speaks for and whose IP '
                    'address SANs hold the relay address it registers. '
                    'Default: ca-cert.pem of [tls] certificates_dir. '
                    'Unused with [tls] enabled = False.'),
    cfg.IntOpt('signature_skew', default=60, min=1, max=3600,
               help='Seconds a signed call\'s timestamp may be away from '
                    'the coordinator\'s clock. The coordinator remembers '
                    'every nonce for this long to refuse replays, so the '
                    'memory it takes grows with it (~150 bytes per call). '
                    'Keep the clocks of the hosts in sync (NTP) well '
                    'within it.'),
    cfg.IntOpt('max_trees_per_node', default=256, min=1,
               help='Trees one node may be in (templates it holds at '
                    'once). A join or heartbeat entry beyond it is refused '
                    'and logged; the node keeps the trees it is in.'),
    cfg.IntOpt('max_templates_per_heartbeat', default=1024, min=1,
               help='Templates taken from one heartbeat; the excess is '
                    'refused and logged (the node\'s trees first).'),
    cfg.IntOpt('max_trees', default=10000, min=1,
               help='Trees the coordinator holds in total (images being '
                    'relayed at once). Joins and heartbeat entries that '
                    'would create a tree beyond it are refused and logged. '
                    'A tree costs ~1 KB plus ~500 bytes per member.'),
]

kernel_group = cfg.OptGroup('kernel', title='kernel data-plane driver')
kernel_opts = [
    cfg.PortOpt('tgt_control_port', default=0,
                help='Management port of the tgtd instance that exports '
                     'this host\'s templates (tgtd -C / tgtadm -C). tgtd '
                     'must be running; the driver only drives it.'),
    cfg.HostAddressOpt('export_address',
                       help='Address children use to reach this host\'s '
                            'iSCSI exports. Required by the kernel driver.'),
    cfg.PortOpt('export_port', default=3260,
                help='TCP port tgtd listens on for iSCSI.'),
    cfg.StrOpt('iqn_prefix', default='iqn.2010-10.org.openstack.thunder',
               regex=r'^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+$',
               help='Prefix of the IQNs under which templates are '
                    'exported; the host name and image id are appended.'),
    cfg.StrOpt('relay_key_file',
               help='File holding the deployment\'s relay key (at least 32 '
                    'bytes of random data, the same on every host, readable '
                    'by the agent only). Each template export gets CHAP '
                    'credentials derived from it and the image id, so a '
                    'child logs in to any parent of the tree without a '
                    'secret ever travelling through the coordinator. '
                    'Required with [relay] enabled; without relay, every '
                    'export gets a random secret of its own.'),
    cfg.StrOpt('device_prefix', default='thunder',
               regex=r'^[a-z][a-z0-9-]{0,31}$',
               help='Prefix of the device-mapper devices this agent '
                    'creates. Agents sharing one kernel (tests) need '
                    'distinct prefixes.'),
    cfg.StrOpt('cache_type', default='bcache',
               choices=[('bcache', 'bcache caches every read miss, so each '
                                   'block crosses each link once'),
                        ('dm-cache', 'dm-cache; its smq policy promotes '
                                     'blocks only after repeated hits')],
               help='Local cache under each template.'),
    cfg.StrOpt('dm_cache_mode', default='writethrough',
               choices=['writethrough', 'passthrough'],
               help='dm-cache mode when cache_type is dm-cache.'),
    cfg.IntOpt('cache_block_size', default=65536, min=32768,
               help='Cache allocation unit in bytes: bcache bucket size or '
                    'dm-cache block size. A power of two.'),
    cfg.IntOpt('cache_min_size_mb', default=1024, min=16,
               help='Minimum size in MiB of a template\'s (sparse) cache '
                    'file. bcache inserts a read miss only when a free '
                    'bucket is at hand; a cache with few buckets drops '
                    'misses under streaming reads and fetches them again.'),
    cfg.FloatOpt('cache_size_ratio', default=2.0, min=1.1,
                 help='Cache file size as a multiple of the image size '
                      '(when above cache_min_size_mb). Sparse: only cached '
                      'blocks take disk space.'),
    cfg.IntOpt('snapshot_chunk_size', default=4096, min=4096,
               help='Copy-on-write granularity of instance snapshots, in '
                    'bytes. A power of two.'),
    cfg.IntOpt('source_recovery_timeout', default=5, min=1,
               help='Seconds an iSCSI session to a source waits for its '
                    'target to come back before failing I/O to the '
                    'multipath device above it, which then queues the I/O '
                    'until the template is re-parented.'),
    cfg.IntOpt('device_scan_attempts', default=3, min=1,
               help='SCSI rescans before an attached source LUN is '
                    'declared missing.'),
    cfg.IntOpt('teardown_timeout', default=60, min=1,
               help='Seconds to wait for a cache or device to go away '
                    'during teardown.'),
]

tls_group = cfg.OptGroup(
    'tls', title='TLS and node identity',
    help='Every TCP NBD link (origin to relay, relay to relay) is TLS with '
         'X.509 certificates checked both ways, and every coordinator '
         'message is signed with the node\'s key. The operator gives each '
         'node a key and a certificate issued by the deployment\'s CA.')
tls_opts = [
    cfg.BoolOpt('enabled', default=True,
                help='TLS on every TCP NBD link and signed coordinator '
                     'messages. Turn it off only in a lab: without it any '
                     'host that reaches a relay port reads the image, and '
                     'any RabbitMQ client can re-shape the relay trees.'),
    cfg.StrOpt('certificates_dir', default='/etc/thunder-agent/pki',
               help='Directory with this node\'s credentials, in the '
                    'layout QEMU and libnbd read: ca-cert.pem (the '
                    'deployment CA), server-cert.pem and server-key.pem, '
                    'client-cert.pem and client-key.pem (the same key and '
                    'certificate may serve both roles: it must allow TLS '
                    'server and client use). The certificate\'s common name '
                    'is the node\'s [DEFAULT] host and its IP address '
                    'subject alternative names are the addresses it relays '
                    'from ([relay] listen_address, [kernel] '
                    'export_address). Keys must be readable by root only.'),
]

_GROUPS = ((agent_group, agent_opts), (cache_group, cache_opts),
           (qemu_group, qemu_opts), (relay_group, relay_opts),
           (prefetch_group, prefetch_opts),
           (coordinator_group, coordinator_opts),
           (kernel_group, kernel_opts), (tls_group, tls_opts))


def register_opts(conf):
    """Register every agent and coordinator option on *conf*.

    Idempotent. ``[DEFAULT] host`` is left alone where the process already
    has one (same meaning, e.g. Nova's).
    """
    if 'host' not in conf:
        conf.register_opts(default_opts)
    for group, opts in _GROUPS:
        # A group object of its own: oslo.config keeps a group's overrides
        # in the OptGroup, so sharing the module's would leak overrides
        # from one ConfigOpts to every other (several agents in a test).
        conf.register_group(cfg.OptGroup(group.name, title=group.title,
                                         help=group.help))
        conf.register_opts(opts, group=group.name)
    return conf


def list_opts():
    return [('DEFAULT', default_opts)] + list(_GROUPS)
