"""Request concurrency of one thunder-agent, measured on a real agent.

Why: Nova calls the agent's ``prepare`` once per VM, each call bounded by
its RPC timeout (nova.conf [thunder] timeout, 300 s); a boot storm puts
tens of them on one host at once. The agent of the previous release held
one host-wide lock across slow work, so with relay enabled and no
coordinator answering, prepares of *different* images ran one after the
other, each waiting for its coordinator join to time out (60 s, see
COORDINATOR_WAITS), and its heartbeats waited as long under the same
lock: the n-th VM waited n x 60 s or more, and the fifth one of a storm
already passed Nova's 300 s. The re-cut agent keeps per-image
state machines, bounds the join by [relay] join_timeout (5 s) and, once a
call went unanswered, does not wait for the coordinator at all until a
heartbeat gets an answer again. The goal measured here::

    max(distinct) <= alone + the bounded coordinator wait  (<< 300 s)

Set-up (:class:`Bench`): a private RabbitMQ on a loopback port; one NBD
origin, a qemu-storage-daemon with one raw image file as one read-only
node and one export per image id (QEMU 7.2 serves any number of
read-only exports of one node), on a unix socket; ONE real thunder-agent
process with the qemu driver, ``[relay] enabled = true`` and ``[coordinator]
topic`` set to a topic nobody serves. The agent may run from another tree
and interpreter (``agent_root``, ``agent_python``): its config file is
written here, from the option names that tree registers (read from its
``thunder_agent.conf.list_opts()``), so the same benchmark measures the
old release and the new one.

Scenarios, each on images no earlier scenario used:

* ``alone``: one prepare (template and snapshot) of a fresh image;
* ``distinct``: N concurrent prepares of N different images;
* ``shared``: N concurrent prepares of one image with N instance ids; the
  agent must build exactly one template (get_status shows one template
  with N snapshots, one qemu-storage-daemon of the image under the run
  path).

Every call has the per-call timeout of Nova (default 300 s): a call that
exceeds it counts as an error, as it would fail the VM's boot. Latency
figures cover every call, failed ones with the time they took to fail.
The agent's RPC server runs up to 64 calls at once (oslo.messaging's
executor_thread_pool_size): above that, calls queue in the broker.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import oslo_messaging as messaging
from oslo_config import cfg
from oslo_utils import excutils

from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent import rpc
from thunder_agent.rpc import api as agent_api
from thunder_lab.bench import metrics
from thunder_lab.emulation import images
from thunder_lab.emulation import rabbitmq
from thunder_lab.emulation import reader

MIB = 1 << 20
SCENARIOS = ('alone', 'distinct', 'shared')
DEFAULT_IMAGES = 50
DEFAULT_IMAGE_MIB = 64
# Nova's per-call RPC timeout for thunder calls (nova.conf [thunder]).
DEFAULT_TIMEOUT = 300
# How long an agent may take from its start to its first answer: the old
# release imports its whole tree, and the broker connection retries.
AGENT_START_TIMEOUT = 90
# Seconds between two progress lines of a running scenario.
PROGRESS_INTERVAL = 5.0
# Groups registered by thunder_agent.conf in both trees; names in them are
# checked against the tree being measured. Other groups (oslo.messaging's,
# oslo.log's) are passed through as given.
THUNDER_GROUPS = ('agent', 'cache', 'qemu', 'relay', 'prefetch',
                  'coordinator', 'kernel')
# What bounds a new template's wait for the coordinator, newest tree first:
# (option the tree registers, option that bounds the join, its default
# where the tree does not register it, a note for the report). The re-cut
# agent has [relay] join_timeout. The previous release meant [coordinator]
# rpc_timeout (30 s), but its CoordinatorAPI._call passes timeout=None to
# prepare(), which oslo.messaging takes as "drop this client's timeout":
# the join is bounded by oslo.messaging's [DEFAULT] rpc_response_timeout
# (60 s) instead. Measured: ``alone`` takes 60.2 s with the defaults and
# 10.1 s with rpc_response_timeout = 10, whatever rpc_timeout says.
COORDINATOR_WAITS = (
    ('relay.join_timeout', 'relay.join_timeout', None, None),
    ('coordinator.rpc_timeout', 'DEFAULT.rpc_response_timeout', 60,
     'this tree\'s join drops [coordinator] rpc_timeout: prepare('
     'timeout=None)'),
)
# Lists the agent tree's options as JSON {"group.name": default}. Run by
# the agent's interpreter in the agent's tree; both trees have list_opts().
_LIST_OPTS = '''
import json
from thunder_agent import conf
out = {}
for group, opts in conf.list_opts():
    name = group if isinstance(group, str) else group.name
    for opt in opts:
        out[name + '.' + opt.dest] = opt.default
print(json.dumps(out, default=str))
'''


class BenchError(Exception):
    """The benchmark could not be set up or run (not a measured error)."""


# -- pure parts ------------------------------------------------------------
def summarize(latencies, errors, wall_s):
    """Figures of one scenario: *latencies* of every call (seconds),
    *errors* the error strings of the failed ones."""
    return {
        'calls': len(latencies),
        'errors': len(errors),
        'p50_s': metrics.percentile(latencies, 50),
        'p90_s': metrics.percentile(latencies, 90),
        'max_s': max(latencies) if latencies else None,
        'wall_s': wall_s,
    }


def parse_agent_option(text):
    """``GROUP.NAME=VALUE`` -> (group, name, value); ValueError if not."""
    key, sep, value = text.partition('=')
    group, dot, name = key.strip().partition('.')
    if not sep or not dot or not group or not name or '.' in name:
        raise ValueError('%r is not GROUP.NAME=VALUE (e.g. '
                         'relay.join_timeout=3)' % text)
    if '\n' in value:
        raise ValueError('%r: the value spans lines' % text)
    return group, name, value.strip()


def coordinator_wait(known, groups):
    """(option name, seconds, note) bounding a new template's wait for the
    coordinator in the tree (*known*: {"group.name": default}): the value
    in the config *groups* if set there, else the default."""
    for marker, name, default, note in COORDINATOR_WAITS:
        if marker not in known:
            continue
        group, opt = name.split('.')
        value = groups.get(group, {}).get(opt, known.get(name, default))
        return name, float(value), note
    raise BenchError('the agent tree has none of %s' % ', '.join(
        entry[0] for entry in COORDINATOR_WAITS))


def agent_config(known, host, transport_url, workdir, coordinator_topic,
                 ports, overrides=()):
    """The agent's config file as {group: {name: value}}.

    *known* is {"group.name": default} of the tree being measured; only
    names it has are written in thunder's groups, so the file works for
    the old release and the new one alike. *ports* is (first, last) of
    the relay export ports, *overrides* (group, name, value) tuples
    (``--agent-option``). BenchError names an option the tree lacks.
    """
    groups = {
        'DEFAULT': {'host': host, 'transport_url': transport_url,
                    'log_file': os.path.join(workdir, 'agent.log'),
                    'debug': 'false'},
        'agent': {'state_path': os.path.join(workdir, 'state'),
                  'run_path': os.path.join(workdir, 'run'),
                  'backend': 'qemu'},
        'relay': {'enabled': 'true', 'listen_address': '127.0.0.1',
                  'port_min': str(ports[0]), 'port_max': str(ports[1])},
        'coordinator': {'topic': coordinator_topic},
    }
    if 'tls.enabled' in known:
        # What is measured is the manager against a silent coordinator:
        # no credentials needed (the old release has no [tls]).
        groups['tls'] = {'enabled': 'false'}
    for group, name, value in overrides:
        groups.setdefault(group, {})[name] = value
    for group, values in groups.items():
        for name in values:
            thunder = group in THUNDER_GROUPS or (
                group == 'DEFAULT' and name == 'host')
            if thunder and '%s.%s' % (group, name) not in known:
                raise BenchError(
                    'the agent tree has no option [%s] %s' % (group, name))
    return groups


def render_config(groups):
    """An ini file from {group: {name: value}}."""
    lines = []
    for group, values in groups.items():
        lines.append('[%s]' % group)
        lines.extend('%s = %s' % (name, value)
                     for name, value in values.items())
        lines.append('')
    return '\n'.join(lines)


def redact_url(url):
    """*url* without the password of its credentials."""
    scheme, sep, rest = url.partition('://')
    creds, at, hostpart = rest.rpartition('@')
    if not sep or not at:
        return url
    user = creds.split(':', 1)[0]
    return '%s://%s:***@%s' % (scheme, user, hostpart)


def bound(result):
    """The check of the goal: max(distinct) <= alone + coordinator wait.

    None when a scenario it needs did not run, or when ``alone`` ran after
    ``distinct``: the new agent then knows the coordinator is down, and
    ``alone`` shows the build time without any coordinator wait.
    """
    order = list(result['scenarios'])
    scenarios = result['scenarios']
    if 'alone' not in scenarios or 'distinct' not in scenarios or (
            order.index('alone') > order.index('distinct')):
        return None
    alone = scenarios['alone']['max_s']
    worst = scenarios['distinct']['max_s']
    limit = alone + result['coordinator_wait']['seconds']
    return {'alone_s': alone, 'max_distinct_s': worst, 'limit_s': limit,
            'ok': worst <= limit and not scenarios['distinct']['errors']}


def _fmt(value, spec='%.2f'):
    return '-' if value is None else spec % value


def _checks(name, figures):
    checks = figures.get('checks', {})
    parts = []
    if 'templates' in checks:
        parts.append('%d template(s)' % checks['templates'])
    if 'snapshots' in checks:
        parts.append('%d snapshot(s)' % checks['snapshots'])
    if 'daemons' in checks:
        parts.append('%d daemon(s)' % checks['daemons'])
    if checks.get('data_ok') is not None:
        parts.append('data %s' % ('ok' if checks['data_ok'] else 'WRONG'))
    return ', '.join(parts)


def format_table(result):
    """The human-readable report of a run (the JSON's content)."""
    agent = result['agent']
    wait = result['coordinator_wait']
    lines = [
        'thunder-bench-agent: agent tree %s (python %s)'
        % (agent['root'], agent['python']),
        '%d MiB image, per-call timeout %d s (an RPC exceeding it counts '
        'as an error)' % (result['image_mib'], result['timeout_s']),
        'coordinator wait bounded by [%s] %s = %g s (topic %s has no '
        'server)' % (tuple(wait['option'].split('.')) + (wait['seconds'],
                                                         wait['topic'])),
    ]
    if wait.get('note'):
        lines.append('  (%s)' % wait['note'])
    lines += [
        '',
        '%-9s %6s %6s %8s %8s %8s %8s  %s' % (
            'scenario', 'calls', 'errors', 'p50 s', 'p90 s', 'max s',
            'wall s', 'checks'),
    ]
    for name, figures in result['scenarios'].items():
        lines.append('%-9s %6d %6d %8s %8s %8s %8s  %s' % (
            name, figures['calls'], figures['errors'],
            _fmt(figures['p50_s']), _fmt(figures['p90_s']),
            _fmt(figures['max_s']), _fmt(figures['wall_s']),
            _checks(name, figures)))
    check = result.get('bound')
    if check is None and {'alone', 'distinct'} <= set(result['scenarios']):
        lines += ['', 'bound: not checked, alone ran after distinct']
    if check is not None:
        lines += ['', 'bound: max(distinct) %.2f s %s alone %.2f s + '
                  'coordinator wait %g s = %.2f s: %s' % (
                      check['max_distinct_s'],
                      '<=' if check['max_distinct_s'] <= check['limit_s']
                      else '>', check['alone_s'], wait['seconds'],
                      check['limit_s'], 'met' if check['ok'] else
                      'NOT met')]
    down = ['%s %s' % (name, 'yes' if f['coordinator_down_before'] else 'no')
            for name, f in result['scenarios'].items()
            if f.get('coordinator_down_before') is not None]
    if down:
        lines.append('agent knew the coordinator down before: %s'
                     % ', '.join(down))
    for name, figures in result['scenarios'].items():
        for error, count in sorted(figures.get('error_kinds', {}).items()):
            lines.append('%s: %d x %s' % (name, count, error))
        if figures.get('orphans'):
            lines.append('%s: the agent still made %d snapshot(s) for '
                         'calls that had failed (orphans: Nova gave up on '
                         'those VMs)' % (name, figures['orphans']))
        for problem in figures.get('problems', []):
            lines.append('%s: %s' % (name, problem))
    return '\n'.join(lines)


def error_kind(exc, timeout):
    """A short, countable description of a failed call."""
    if isinstance(exc, messaging.MessagingTimeout):
        return 'no answer within %g s (timeout)' % timeout
    text = str(exc).strip().splitlines()
    return '%s: %s' % (type(exc).__name__, text[0][:200] if text else '')


# -- processes -------------------------------------------------------------
def _cmdlines(proc='/proc'):
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, 'cmdline'), 'rb') as f:
                argv = f.read().split(b'\0')
        except OSError:
            continue
        if argv and argv[0]:
            yield int(name), [a.decode(errors='replace') for a in argv if a]


def storage_daemons(run_path, image_id, proc='/proc'):
    """Pids of the qemu-storage-daemon processes of *image_id* below
    *run_path* (their monitor socket is ``<run_path>/<image_id>.qmp`` in
    both trees)."""
    marker = os.path.join(run_path, image_id + '.')
    return sorted(pid for pid, argv in _cmdlines(proc)
                  if os.path.basename(argv[0]) == 'qemu-storage-daemon'
                  and any(marker in arg for arg in argv[1:]))


def processes_under(path, proc='/proc'):
    """Pids of processes naming a file below *path* on their command line:
    the data-plane daemons an agent with that run path started (they
    daemonize, so they are not in the agent's process group)."""
    prefix = os.path.join(path, '')
    return sorted(pid for pid, argv in _cmdlines(proc)
                  if pid != os.getpid() and any(prefix in a for a in argv))


def private_epmd(port, node, proc='/proc'):
    """Pids of the epmd started for the broker *node* on *port*.

    rabbitmq-server starts ``epmd -daemon`` with its port in the
    environment only, so it outlives the broker and the command line does
    not tell whose it is; the environment does.
    """
    wanted = {b'ERL_EPMD_PORT=%d' % port,
              b'RABBITMQ_NODENAME=' + node.encode()}
    pids = []
    for pid, argv in _cmdlines(proc):
        if os.path.basename(argv[0]) != 'epmd':
            continue
        try:
            with open(os.path.join(proc, str(pid), 'environ'), 'rb') as f:
                env = set(f.read().split(b'\0'))
        except OSError:
            continue
        if wanted <= env:
            pids.append(pid)
    return sorted(pids)


def free_port_range(count, host='127.0.0.1', start=20000, stop=60000):
    """(first, last) of *count* consecutive TCP ports free on *host* now,
    for the agent's relay exports; a random place, so that concurrent
    runs rarely meet."""
    import random
    import socket
    for _ in range(200):
        first = random.randrange(start, stop - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return first, first + count - 1
    raise BenchError('no %d consecutive free ports on %s' % (count, host))


def _kill(pids, grace=5.0):
    """SIGTERM the given pids, SIGKILL those left after *grace* seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _alive(p)]
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


class Origin:
    """One qemu-storage-daemon serving one raw file under many export
    names (read-only, one node), over a unix socket."""

    def __init__(self, image_path, image_ids, workdir):
        self.image_path = image_path
        self.image_ids = list(image_ids)
        self.socket = os.path.join(workdir, 'origin.sock')
        self.daemon = storage_daemon.StorageDaemon(
            'origin', os.path.join(workdir, 'origin'))

    def start(self):
        args = ['--blockdev', json.dumps({
            'driver': 'file', 'node-name': 'image-file',
            'filename': self.image_path, 'read-only': True}),
            '--blockdev', json.dumps({
                'driver': 'raw', 'node-name': 'image', 'file': 'image-file',
                'read-only': True})]
        for i, image_id in enumerate(self.image_ids):
            args += ['--export', json.dumps({
                'type': 'nbd', 'id': 'e%d' % i, 'node-name': 'image',
                'name': image_id, 'writable': False})]
        self.daemon.start(nbd_server={'type': 'unix', 'path': self.socket},
                          extra_args=args)
        return self

    def connection(self, image_id):
        return {'driver_volume_type': 'nbd',
                'data': {'socket': self.socket, 'export': image_id}}

    def stop(self):
        self.daemon.stop()


class AgentUnderTest:
    """ONE thunder-agent process from tree *root* (None: the installed
    one) run by *python*, with the config file *groups*."""

    def __init__(self, groups, workdir, python=None, root=None):
        self.groups = groups
        self.workdir = workdir
        self.python = python or sys.executable
        self.root = root
        self.host = groups['DEFAULT']['host']
        self.run_path = groups['agent']['run_path']
        self.log_file = groups['DEFAULT']['log_file']
        self.conf_file = os.path.join(workdir, 'agent.conf')
        self.proc = None

    def start(self, ping):
        # The transport URL holds the broker's credentials.
        fd = os.open(self.conf_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(render_config(self.groups))
        env = dict(os.environ)
        if self.root:
            env['PYTHONPATH'] = self.root
        with open(self.log_file + '.stderr', 'ab') as err:
            self.proc = subprocess.Popen(
                [self.python, '-m', 'thunder_agent.cmd.agent',
                 '--config-file', self.conf_file],
                cwd=self.root or None, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError('the agent exited with %s: %s'
                                 % (self.proc.returncode, self.log_tail()))
            try:
                ping()
                return self
            except messaging.MessagingException:
                if time.monotonic() >= deadline:
                    raise BenchError('the agent did not answer within %d '
                                     's: %s' % (AGENT_START_TIMEOUT,
                                                self.log_tail()))
                time.sleep(0.3)

    def log_tail(self, size=2000):
        out = ''
        for path in (self.log_file + '.stderr', self.log_file):
            with contextlib.suppress(OSError):
                with open(path, 'rb') as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - size))
                    out += f.read().decode(errors='replace')
        return out

    def stop(self):
        """Stop the agent (SIGTERM, then SIGKILL to its group) and every
        data-plane daemon it started."""
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            self.proc = None
        _kill(processes_under(self.run_path))


# -- the benchmark ---------------------------------------------------------
def read_agent_options(python=None, root=None, timeout=60):
    """{"group.name": default} of every option the agent tree registers."""
    env = dict(os.environ)
    if root:
        env['PYTHONPATH'] = root
    try:
        proc = subprocess.run([python or sys.executable, '-c', _LIST_OPTS],
                              cwd=root or None, env=env, capture_output=True,
                              text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError('cannot list the agent tree\'s options: %s' % e)
    if proc.returncode != 0:
        raise BenchError('cannot list the agent tree\'s options: %s'
                         % proc.stderr.strip()[-1000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _Progress:
    """A line every PROGRESS_INTERVAL seconds while a scenario runs."""

    def __init__(self, name, total, say, interval=PROGRESS_INTERVAL):
        self.name = name
        self.total = total
        self.say = say
        self.interval = interval
        self.done = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def line(self):
        with self._lock:
            return '%s: %d/%d done, %d error(s), %.1f s' % (
                self.name, self.done, self.total, self.errors,
                time.monotonic() - self._started)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.say(self.line())

    def add(self, ok):
        with self._lock:
            self.done += 1
            self.errors += 0 if ok else 1

    def __enter__(self):
        self.say('%s: %d call(s) started' % (self.name, self.total))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.say(self.line())


class Bench:
    """One run: broker, origin and agent up, the scenarios, teardown.

    *images* is N of the distinct and shared scenarios; *options* are
    (group, name, value) for the agent's config; *say* prints progress.
    """

    def __init__(self, images=DEFAULT_IMAGES, image_mib=DEFAULT_IMAGE_MIB,
                 timeout=DEFAULT_TIMEOUT, scenarios=SCENARIOS, options=(),
                 agent_root=None, agent_python=None, verify=True,
                 agent_log=None, say=print):
        if images < 1 or image_mib < 1 or timeout <= 0:
            raise BenchError('images, image size and timeout must be '
                             'positive')
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown or not scenarios:
            raise BenchError('scenarios are %s' % ', '.join(SCENARIOS))
        self.images = images
        self.image_mib = image_mib
        self.timeout = timeout
        self.scenarios = list(scenarios)
        self.options = list(options)
        self.agent_root = os.path.abspath(agent_root) if agent_root else None
        self.agent_python = agent_python
        self.verify = verify
        self.agent_log = agent_log
        self.say = say
        self.workdir = None
        self.broker = None
        self.origin = None
        self.agent = None
        self.transport = None
        self.client = None
        self.last_workdir = None
        self.last_broker = None

    # -- set-up ----------------------------------------------------------
    def _image_ids(self):
        ids = {'alone': [str(uuid.uuid4())],
               'distinct': [str(uuid.uuid4()) for _ in range(self.images)],
               'shared': [str(uuid.uuid4())]}
        return {name: ids[name] for name in self.scenarios}

    def setup(self):
        known = read_agent_options(self.agent_python, self.agent_root)
        # Short: the agent's unix sockets live below it.
        self.workdir = tempfile.mkdtemp(prefix='tba-', dir='/tmp')
        self.image_path = images.make_image(
            os.path.join(self.workdir, 'image.raw'), self.image_mib * MIB)
        self.image_sha256 = images.sha256_file(self.image_path)
        self.ids = self._image_ids()
        all_ids = [i for ids in self.ids.values() for i in ids]
        self.say('origin: one %d MiB image under %d export names'
                 % (self.image_mib, len(all_ids)))
        self.origin = Origin(self.image_path, all_ids, self.workdir).start()
        self.say('starting a private RabbitMQ')
        self.broker = rabbitmq.RabbitMQ()
        self.broker.start()
        suffix = uuid.uuid4().hex[:8]
        self.coordinator_topic = 'thunder-bench-nobody-%s' % suffix
        groups = agent_config(
            known, 'bench-agent-%s' % suffix, self.broker.transport_url,
            os.path.join(self.workdir, 'agent'), self.coordinator_topic,
            free_port_range(len(all_ids) + 4), self.options)
        if 'agent.origin_socket_dirs' in known:
            # A tree with origin allow-lists reads the origin's socket
            # only once its directory is listed.
            groups['agent'].setdefault('origin_socket_dirs', self.workdir)
        os.makedirs(os.path.join(self.workdir, 'agent'))
        self.wait_option, self.wait_s, self.wait_note = coordinator_wait(
            known, groups)
        self.groups = groups
        self.transport = rpc.get_transport(cfg.CONF,
                                           self.broker.transport_url)
        topic = groups['agent'].get('topic', known['agent.topic'])
        self.client = agent_api.AgentAPI(self.transport, topic=topic,
                                         timeout=self.timeout)
        self.agent = AgentUnderTest(groups, os.path.join(self.workdir,
                                                         'agent'),
                                    self.agent_python, self.agent_root)
        self.say('starting the agent (%s)' % (self.agent_root or
                                              'installed tree'))
        self.agent.start(lambda: self.client.get_status(self.agent.host,
                                                        timeout=2))

    def teardown(self):
        """Everything down and removed; each step runs even if one
        before it failed."""
        steps = [('agent', lambda: self.agent and self.agent.stop()),
                 ('transport', lambda: self.transport and
                  self.transport.cleanup()),
                 ('origin', lambda: self.origin and self.origin.stop()),
                 ('broker', self._stop_broker)]
        if self.agent_log and self.agent is not None:
            steps.append(('agent log', lambda: shutil.copyfile(
                self.agent.log_file, self.agent_log)))
        for name, step in steps:
            try:
                step()
            except Exception as e:
                self.say('teardown of the %s failed: %s' % (name, e))
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        # What the run used, for callers checking that nothing is left.
        self.last_workdir = self.workdir
        if self.broker is not None:
            self.last_broker = (self.broker.port,
                                getattr(self.broker, 'epmd_port', None))
        self.agent = self.origin = self.broker = self.transport = None
        self.workdir = None

    def _stop_broker(self):
        broker = self.broker
        if broker is None or broker.port is None:
            return
        broker.stop()
        # Also after a failed start, which stopped the broker itself.
        _kill(private_epmd(broker.epmd_port,
                           'thunder%d@localhost' % broker.port))

    # -- scenarios -------------------------------------------------------
    def _prepare(self, image_id, instance_id):
        return self.client.prepare(
            self.agent.host, image_id, self.origin.connection(image_id),
            self.image_mib * MIB, 'raw', instance_id)

    def _concurrent(self, name, calls):
        """Run *calls* [(image_id, instance_id)] at once; per-call
        results [(latency, connection_info or None, error or None)]."""
        results = [None] * len(calls)
        barrier = threading.Barrier(len(calls) + 1)

        def one(i, image_id, instance_id, progress):
            barrier.wait()
            start = time.monotonic()
            try:
                info = self._prepare(image_id, instance_id)
                results[i] = (time.monotonic() - start, info, None)
            except Exception as e:
                # Whatever fails a call is a figure of the run (Nova would
                # fail that VM's boot): counted and reported by kind.
                results[i] = (time.monotonic() - start, None,
                              error_kind(e, self.timeout))
            progress.add(results[i][2] is None)

        with _Progress(name, len(calls), self.say) as progress:
            # Daemon threads: a Ctrl-C must not wait for 300 s calls.
            threads = [threading.Thread(target=one, daemon=True,
                                        args=(i, image, inst, progress))
                       for i, (image, inst) in enumerate(calls)]
            for t in threads:
                t.start()
            barrier.wait()
            started = time.monotonic()
            for t in threads:
                t.join()
            wall = time.monotonic() - started
        return results, wall

    def run_scenario(self, name):
        ids = self.ids[name]
        if name == 'shared':
            calls = [(ids[0], str(uuid.uuid4())) for _ in range(self.images)]
        else:
            calls = [(image_id, str(uuid.uuid4())) for image_id in ids]
        before = self._relay_state()
        results, wall = self._concurrent(name, calls)
        latencies = [r[0] for r in results]
        errors = [r[2] for r in results if r[2] is not None]
        figures = summarize(latencies, errors, wall)
        kinds = {}
        for error in errors:
            kinds[error] = kinds.get(error, 0) + 1
        figures['error_kinds'] = kinds
        figures['latencies_s'] = latencies
        figures['coordinator_down_before'] = before
        ok = [(call, r[1]) for call, r in zip(calls, results)
              if r[2] is None]
        figures['failed_instances'] = [call[1] for call, r in
                                       zip(calls, results) if r[2]]
        figures['checks'], figures['problems'] = self._check(name, ok)
        return figures

    def count_orphans(self, result):
        """Snapshots the agent made for calls that had failed (a timed-out
        call the agent still finished: Nova gave up on that VM, so nobody
        will delete them). Counted once every scenario ran."""
        failed = {name: set(f['failed_instances'])
                  for name, f in result['scenarios'].items()}
        if not any(failed.values()):
            for figures in result['scenarios'].values():
                figures['orphans'] = 0
            return
        status = self.client.get_status(self.agent.host)
        made = {i for t in status['templates'] for i in t['snapshots']}
        for name, figures in result['scenarios'].items():
            figures['orphans'] = len(failed[name] & made)

    def _relay_state(self):
        """The new agent's view of the coordinator (None: not reported)."""
        status = self.client.get_status(self.agent.host)
        return status.get('relay', {}).get('coordinator_down')

    def _check(self, name, ok):
        """What the agent built for the calls that succeeded: templates,
        snapshots and daemons per image, and one snapshot's bytes."""
        status = self.client.get_status(self.agent.host)
        templates = {t['image_id']: t for t in status['templates']}
        run_path = self.agent.run_path
        problems = []
        images_asked = sorted({call[0] for call, _ in ok})
        built = [i for i in images_asked if i in templates]
        snapshots = 0
        daemons = 0
        for image_id in images_asked:
            wanted = sorted(call[1] for call, _ in ok if call[0] == image_id)
            template = templates.get(image_id)
            if template is None:
                problems.append('image %s answered but has no template'
                                % image_id)
                continue
            have = sorted(template['snapshots'])
            snapshots += len(have)
            if have != wanted:
                problems.append('template %s has %d snapshot(s), %d '
                                'prepare(s) succeeded' % (
                                    image_id, len(have), len(wanted)))
            count = len(storage_daemons(run_path, image_id))
            daemons += count
            if count != 1:
                problems.append('image %s has %d qemu-storage-daemon '
                                'processes' % (image_id, count))
        checks = {'templates': len(built), 'snapshots': snapshots,
                  'daemons': daemons, 'data_ok': None}
        if self.verify and ok:
            digest, size = reader.checksum(ok[-1][1])
            checks['data_ok'] = (digest == self.image_sha256
                                 and size == self.image_mib * MIB)
            if not checks['data_ok']:
                problems.append('snapshot %s does not read the image'
                                % ok[-1][0][1])
        return checks, problems

    # -- the whole run ---------------------------------------------------
    def run(self):
        """Set up, run every scenario, tear down; returns the result."""
        try:
            self.setup()
            result = {
                'agent': {'root': self.agent_root or 'installed',
                          'python': self.agent_python or sys.executable,
                          'config': _redacted(self.groups)},
                'image_mib': self.image_mib,
                'images': self.images,
                'timeout_s': self.timeout,
                'coordinator_wait': {'option': self.wait_option,
                                     'seconds': self.wait_s,
                                     'note': self.wait_note,
                                     'topic': self.coordinator_topic},
                'scenarios': {},
            }
            for name in self.scenarios:
                result['scenarios'][name] = self.run_scenario(name)
            self.count_orphans(result)
            result['bound'] = bound(result)
            return result
        except BaseException:
            with excutils.save_and_reraise_exception():
                if self.agent is not None:
                    self.say('agent log tail:\n%s' % self.agent.log_tail())
        finally:
            self.say('cleaning up')
            self.teardown()


def _redacted(groups):
    out = {g: dict(v) for g, v in groups.items()}
    out['DEFAULT']['transport_url'] = redact_url(
        out['DEFAULT']['transport_url'])
    return out
