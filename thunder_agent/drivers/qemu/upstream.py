"""The TCP side of a relaying template: the verifier and a ``socat`` listener.

**Upstream** (:class:`Upstream`): a template's NBD client connects to
``<run_path>/<image_id>.up``, a unix socket served by the verifier
(:mod:`~thunder_agent.drivers.qemu.verifier_plugin`: nbdkit, libnbd), which
reads each request from the template's current parent, checks every block
against the image's manifest and takes any block that does not match, and
from then on everything, from the origin. It is the one NBD client of the
parent and of the origin, so TLS is its business: the template daemon
talks plain NBD to the local socket. Re-parenting replaces the verifier and
drops its connections: QEMU's NBD client then reconnects (within ``[qemu]
reconnect_delay``) to the same socket and so to the new parent, re-sending
the requests that were in flight. Reads block and resume; nothing fails and
the block graph never changes. (QEMU cannot re-point an NBD node at another
server, and replacing the node would drain requests that wait for a dead
parent.) What the verifier rejected is in ``<image_id>.mismatch`` (JSON),
its counters in ``<image_id>.verify``, both next to the socket.
:meth:`Upstream.start` (socat to the source, unchecked) is the layout
before the verifier.

**Relay listener** (:class:`RelayListener`): children reach the template on
its relay address (``[relay] listen_address``, a port of ``port_min..
port_max``), where socat listens and forwards each connection to the
template daemon's unix socket. QEMU 7.2 runs one NBD server per process with
one listening address (``nbd-server-start`` refuses a second server), and
its ``max-connections`` counts every client of that server: with the daemon
listening on TCP itself, strangers holding connections open (100 by QEMU's
default) kept local VMs, the agent's flushes and its prefetcher out. The
daemon now listens on its unix socket only, for local readers; the listener
admits at most *max_children* TCP connections at once (socat
``max-children``; one more waits in the kernel's accept queue, not in
QEMU), refuses connections from outside ``[relay] peer_networks`` before
they take a slot (socat ``range``, when the networks of the listen
address's family are one network), and sets TCP_NODELAY (QEMU 7.2's NBD
server leaves Nagle on, which delays the last chunk of each reply by the
peer's delayed ACK, ~40 ms).

What a stranger who reaches the relay port from ``peer_networks`` still
gets, until TLS with client authorization keeps strangers out: the image
(what any child reads), and fetches it can trigger without reading them,
since ``NBD_CMD_CACHE`` passes the listener like any request and makes the
template fetch the range into its cache. That is bounded by the
listener's slots (``[qemu] relay_connections`` connections at once), by
the template's size (each block is fetched once, then served from the
cache), and, for what the node sends, by ``[relay] rate_limit_mbit``; what
it fetches from its parent meanwhile is not rate-capped (``[prefetch]
max_rate_mb`` caps the agent's own full prefetches only). Local readers are
not affected: their socket is not the listener's.

Both run in their own session, so they survive agent restarts, and are
re-adopted from their pid files (``<pid> <what it forwards>``).

Addresses reach socat as address strings, whose syntax gives ``:``, ``,``,
``[``, ``(`` and ``!!`` meanings of their own (``!!SYSTEM:...`` runs a
command). Nothing from another host is pasted in as given: an IP address is
written back in canonical form (no IPv6 scope id: its text after ``%`` is
free), a host name must be a plain DNS name (only for origins, which the
operator names), a port an integer, a socket path a safe character set; and
the whole address string is checked against the shapes this module makes
before socat runs. The verifier's ``key=value`` parameters are made and
checked the same way (:func:`verifier_params`; a parent's host must be an
IP literal, the name libnbd checks its certificate's IP SANs against), and
the plugin checks each again.
"""

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import signal
import subprocess
import time

from oslo_log import log as logging

from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent import exception

LOG = logging.getLogger(__name__)

SOCAT = 'socat'
NBDKIT = 'nbdkit'
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'verifier_plugin.py')
# socat's transfer buffer (8 KiB by default): NBD replies are up to 32 MiB.
BUFFER_SIZE = 131072
# Pending connections the relay listener's kernel queue holds while
# max-children are served.
BACKLOG = 16
_HOST_NAME = re.compile(
    r'(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
    r'(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z')
_SOCKET_PATH = re.compile(r'/[A-Za-z0-9._/+-]{0,106}\Z')
# Everything a forwarder is ever given, as made below: nothing else runs.
_HOST = r'(?:\[[0-9a-f:.]+\]|[0-9.]+|[A-Za-z0-9.-]+)'
_TARGET = re.compile(r'(?:UNIX-CONNECT:/[A-Za-z0-9._/+-]+'
                     r'|TCP:%s:[0-9]{1,5})\Z' % _HOST)
_LISTEN = re.compile(
    r'(?:UNIX-LISTEN:/[A-Za-z0-9._/+-]+,fork,unlink-early,mode=600'
    r'|TCP[46]-LISTEN:[0-9]{1,5},bind=%s,reuseaddr,fork,'
    r'max-children=[0-9]+,backlog=[0-9]+,nodelay'
    r'(?:,ipv6only=1)?(?:,range=%s/[0-9]{1,3})?)\Z' % (_HOST, _HOST))
_OPTIONS = re.compile(r'(?:,connect-timeout=[0-9]+,nodelay)?\Z')
_EXPORT = re.compile(r'[A-Za-z0-9._-]{1,255}\Z')
# The verifier's parameters, as verifier_params makes them.
_PARAM = re.compile(
    r'(?:(?:origin|parent)_host=[0-9A-Za-z.:-]+'
    r'|(?:origin|parent)_port=[0-9]{1,5}'
    r'|(?:origin|parent)_export=[A-Za-z0-9._-]+'
    r'|(?:origin_socket|manifest|report|stats|tls_dir)=/[A-Za-z0-9._/+-]+'
    r'|(?:parent_wait|connections)=[0-9]+)\Z')


def ip_literal(host):
    """*host* as an :mod:`ipaddress` address, or ValueError. A scope id
    (``fe80::1%eth0``) is refused: it is free text."""
    if not isinstance(host, str) or '%' in host:
        raise ValueError('not an IP address without scope id')
    return ipaddress.ip_address(host)


def socat_host(host):
    """*host* as it may appear in a socat address, or BackendError."""
    if not isinstance(host, str):
        raise exception.BackendError(reason='host %r is not a string'
                                     % (host,))
    bare = host[1:-1] if host.startswith('[') and host.endswith(']') else (
        host)
    try:
        address = ip_literal(bare)
    except ValueError:
        if '%' not in host and _HOST_NAME.match(host):
            return host
        raise exception.BackendError(
            reason='host %r is neither an IP address nor a DNS name'
                   % (host,))
    return '[%s]' % address if address.version == 6 else str(address)


def socat_path(path):
    """*path* (a unix socket) as it may appear in a socat address."""
    if not isinstance(path, str) or not _SOCKET_PATH.match(path):
        raise exception.BackendError(
            reason='socket path %r has characters the forwarder cannot '
                   'take (letters, digits and ._/+- only)' % (path,))
    return path


def socat_port(port):
    if isinstance(port, bool) or not isinstance(port, int) or not (
            0 < port < 65536):
        raise exception.BackendError(reason='port %r is not valid'
                                     % (port,))
    return port


def describe(endpoint):
    """The socat address reaching an NBD *endpoint* (a
    :class:`~thunder_agent.records.Endpoint`)."""
    data = endpoint.data
    if 'socket' in data:
        return 'UNIX-CONNECT:%s' % socat_path(data['socket'])
    return 'TCP:%s:%d' % (socat_host(data.get('host')),
                          socat_port(data.get('port')))


def _checked(pattern, address):
    # The last line: nothing but the shapes this module makes reaches
    # socat, whatever a caller passed in.
    if not pattern.match(address):
        raise exception.BackendError(
            reason='refusing to give socat the address %r' % (address,))
    return address


class Forwarder:
    """A socat process in a session of its own under *run_path*, known by
    its pid file ``<name>.pid``, which holds the pid and what it forwards.

    :param start_timeout: seconds to wait for it to listen.
    """

    def __init__(self, name, run_path, start_timeout=5):
        self.name = name
        self.pid_path = os.path.join(run_path, name + '.pid')
        self.log_path = os.path.join(run_path, name + '.log')
        self.start_timeout = start_timeout

    def _owns(self, cmdline):
        """True when *cmdline* (bytes of /proc/PID/cmdline) is ours."""
        raise NotImplementedError

    def _listening(self):
        raise NotImplementedError

    @property
    def pid(self):
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().split()[0])
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            return None
        return pid if self._owns(cmdline) else None

    def target(self):
        """What the running forwarder forwards (as :meth:`_run` was
        given it), or None."""
        if self.pid is None:
            return None
        try:
            with open(self.pid_path) as f:
                return f.read().split(None, 1)[1].strip()
        except (OSError, IndexError):
            return None

    def _run(self, listen, address, label):
        """Start socat from *listen* to *address*, replacing any forwarder
        running now; *label* (recorded in the pid file) says what it
        forwards."""
        _checked(_LISTEN, listen)
        self.stop()
        cmd = [SOCAT, '-b', str(BUFFER_SIZE), '-lf', self.log_path, listen,
               address]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        except FileNotFoundError:
            raise exception.BackendError(
                reason='socat is not installed (Debian package socat)')
        self._wait_started(proc, label, 'forwarder %s' % self.name)

    def _wait_started(self, proc, label, what):
        """Record *proc* in the pid file with *label*, then wait up to
        start_timeout for it to listen (BackendError naming *what*)."""
        with open(self.pid_path + '.tmp', 'w') as f:
            f.write('%d %s\n' % (proc.pid, label))
        os.replace(self.pid_path + '.tmp', self.pid_path)
        deadline = time.monotonic() + self.start_timeout
        while not self._listening():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise exception.BackendError(
                    reason='%s did not start: %s' % (what, self.log_tail()))
            time.sleep(0.02)

    def log_tail(self, size=500):
        return storage_daemon.log_tail(self.log_path, size)

    def _remove(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_path)

    def stop(self):
        pid = self.pid
        if pid is not None:
            # The whole session: the listener and its open connections.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and os.path.exists(
                    '/proc/%d' % pid):
                # Reaped here when this process started it.
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.02)
        self._remove()

    def remove_log(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log_path)


class Upstream(Forwarder):
    """The forwarder of template *image_id* to its source, under
    *run_path*.

    :param connect_timeout: seconds socat tries to reach the source for
        each connection; QEMU's NBD client sees the failure and tries again
        after its own reconnect logic.
    :param start_timeout: seconds to wait for the forwarder's socket.
    """

    def __init__(self, image_id, run_path, connect_timeout=5,
                 start_timeout=5):
        super().__init__(image_id + '.up', run_path, start_timeout)
        self.image_id = image_id
        self.socket = os.path.join(run_path, image_id + '.up')
        self.connect_timeout = connect_timeout

    describe = staticmethod(describe)

    def _owns(self, cmdline):
        return self.socket.encode() in cmdline

    def _listening(self):
        return os.path.exists(self.socket)

    def points_at(self, endpoint):
        """True when a forwarder runs and forwards to *endpoint*."""
        return self.target() == describe(endpoint)

    def start(self, endpoint):
        """Forward to *endpoint* (an NBD
        :class:`~thunder_agent.records.Endpoint`), replacing any forwarder
        running now."""
        target = _checked(_TARGET, describe(endpoint))
        listen = 'UNIX-LISTEN:%s,fork,unlink-early,mode=600' % socat_path(
            self.socket)
        options = (',connect-timeout=%d,nodelay' % self.connect_timeout
                   if target.startswith('TCP:') else '')
        self._run(listen, target + _checked(_OPTIONS, options), target)
        LOG.info('Template %s reads through %s', self.image_id, target)

    def _remove(self):
        for path in (self.pid_path, self.socket):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- the verifier ----------------------------------------------------
    @property
    def report_path(self):
        return os.path.join(os.path.dirname(self.socket),
                            self.image_id + '.mismatch')

    @property
    def stats_path(self):
        return os.path.join(os.path.dirname(self.socket),
                            self.image_id + '.verify')

    def verifier_label(self, source, verify):
        """What the pid file says a verifier reading *source* under
        *verify* (a :class:`Verify`) reads: its parameters, checked."""
        return ' '.join(verifier_params(source, verify, self.report_path,
                                        self.stats_path))

    def verifies(self, source, verify):
        """True when a verifier runs for *source* under *verify*."""
        return self.target() == self.verifier_label(source, verify)

    def start_verifier(self, source, verify):
        """Serve the socket with the verifying nbdkit plugin reading
        *source* (a parent, or the origin itself: then the origin only),
        checked against *verify*'s manifest, replacing any forwarder."""
        params = verifier_params(source, verify, self.report_path,
                                 self.stats_path)
        self.stop()
        # A new parent has rejected nothing yet.
        for path in (self.report_path, self.stats_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        cmd = [NBDKIT, '-f', '-r', '-U', socat_path(self.socket), 'python',
               PLUGIN] + params
        try:
            with open(self.log_path, 'ab') as log:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True, umask=0o077)
        except FileNotFoundError:
            raise exception.BackendError(
                reason='nbdkit is not installed (Debian packages nbdkit, '
                       'nbdkit-plugin-python)')
        label = ' '.join(params)
        self._wait_started(proc, label, 'verifier of %s' % self.image_id)
        LOG.info('Template %s reads through the verifier: %s',
                 self.image_id, label)

    def mismatch(self):
        """The verifier's report (a dict) when it rejected its parent's
        bytes, else None."""
        return _read_json(self.report_path)

    def verifier_stats(self):
        """The verifier's counters (a dict), or None."""
        return _read_json(self.stats_path)

    def remove_log(self):
        """Remove the log, report and counters (of a stopped verifier)."""
        super().remove_log()
        for path in (self.report_path, self.stats_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@dataclasses.dataclass(frozen=True)
class Verify:
    """How a verifier checks what it reads: the template's *origin* (an
    NBD :class:`~thunder_agent.records.Endpoint`, the trusted fallback),
    the *manifest* file (None: the origin serves none, so the verifier
    reads the origin only, unchecked), the ``[tls] certificates_dir``
    (None: TLS off), the seconds it waits for a parent that does not
    answer and the libnbd connections it opens to each source."""

    origin: object
    manifest: str
    tls_dir: str = None
    parent_wait: float = 30
    connections: int = 4


def _nbd_params(prefix, endpoint, parent):
    """``key=value`` parameters reaching NBD *endpoint*: a parent's host
    must be an IP literal (libnbd checks the certificate's IP SANs
    against it), an origin's may be a DNS name."""
    data = endpoint.data
    if not isinstance(data, dict):
        raise exception.BackendError(reason='endpoint %r' % (data,))
    export = data.get('export')
    if not isinstance(export, str) or not _EXPORT.match(export):
        raise exception.BackendError(reason='export %r is not valid'
                                     % (export,))
    if 'socket' in data and not parent:
        params = ['%s_socket=%s' % (prefix, socat_path(data['socket']))]
    else:
        host = data.get('host')
        if parent:
            try:
                host = str(ip_literal(host))
            except ValueError:
                raise exception.BackendError(
                    reason='parent host %r is not an IP address literal'
                           % (host,))
        else:
            host = socat_host(host).strip('[]')
        params = ['%s_host=%s' % (prefix, host),
                  '%s_port=%d' % (prefix, socat_port(data.get('port')))]
    return params + ['%s_export=%s' % (prefix, export)]


def verifier_params(source, verify, report, stats):
    """The plugin parameters of a verifier reading *source* (the origin
    when it equals ``verify.origin``), each checked against its shape."""
    params = _nbd_params('origin', verify.origin, parent=False)
    if source != verify.origin:
        if verify.manifest is None:
            raise exception.BackendError(
                reason='a parent\'s bytes cannot be checked without the '
                       'image\'s manifest')
        params += _nbd_params('parent', source, parent=True)
    if verify.manifest is not None:
        params.append('manifest=%s' % socat_path(verify.manifest))
    params += ['report=%s' % socat_path(report),
               'stats=%s' % socat_path(stats),
               'parent_wait=%d' % int(verify.parent_wait),
               'connections=%d' % int(verify.connections)]
    if verify.tls_dir is not None:
        params.append('tls_dir=%s' % socat_path(verify.tls_dir))
    for param in params:
        # The last line, as for socat: nothing else reaches nbdkit.
        if not _PARAM.match(param):
            raise exception.BackendError(
                reason='refusing to give nbdkit the parameter %r'
                       % (param,))
    return params


def _read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class RelayListener(Forwarder):
    """The TCP listener of relaying template *image_id*: forwards each
    connection on ``host:port`` to the daemon's unix socket *socket*."""

    def __init__(self, image_id, run_path, start_timeout=5):
        super().__init__(image_id + '.relay', run_path, start_timeout)
        self.image_id = image_id
        self.port = None

    def _owns(self, cmdline):
        # The pid file's name is in no socat argument; the log file's is.
        return self.log_path.encode() in cmdline

    def _listening(self):
        return self.port is not None and _tcp_listening(self.port)

    @staticmethod
    def describe(host, port, socket, max_children, network=None):
        """The socat listen and target addresses (a pair of strings)."""
        host = socat_host(host)
        six = host.startswith('[')
        listen = 'TCP%d-LISTEN:%d,bind=%s,reuseaddr,fork,max-children=%d,' \
                 'backlog=%d,nodelay' % (6 if six else 4, socat_port(port),
                                         host, int(max_children), BACKLOG)
        if six:
            listen += ',ipv6only=1'
        if network is not None:
            network = ipaddress.ip_network(network)
            listen += ',range=%s/%d' % (
                socat_host(str(network.network_address)),
                network.prefixlen)
        target = 'UNIX-CONNECT:%s' % socat_path(socket)
        return _checked(_LISTEN, listen), _checked(_TARGET, target)

    def points_at(self, *args, **kwargs):
        """True when a listener runs as :meth:`describe` of the arguments
        says."""
        return self.target() == ' '.join(self.describe(*args, **kwargs))

    def start(self, host, port, socket, max_children, network=None):
        """Listen on *host*:*port* for at most *max_children* connections
        at once (from *network* only, when given), each forwarded to the
        unix socket *socket*."""
        listen, target = self.describe(host, port, socket, max_children,
                                       network)
        self.port = port
        self._run(listen, target, '%s %s' % (listen, target))
        LOG.info('Template %s relays on %s', self.image_id, listen)


def _tcp_listening(port):
    """True when a TCP socket of this network namespace listens on
    *port* (any address, either family)."""
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == '0A' and int(
                            fields[1].rsplit(':', 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False
