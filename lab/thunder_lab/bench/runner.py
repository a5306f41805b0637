"""Run boot storms on the emulated cluster, mode after mode.

For every number of hosts H, an emulated cluster (H compute hosts and an
origin host, links shaped to W, a thunder-agent per host) is started and
the modes run on it one after the other (``direct`` on a second one whose
coordinator puts every host under the origin); each storm uses a new image
id, so nothing cached carries over. At time 0 every host starts getting
the image its mode's way and boots V VMs; the storm ends when the last VM
has booted. Modes:

``full-copy``
    each host downloads the whole image over HTTP (nginx on the origin
    host, curl on the host), then boots its VMs from the local copy;
``p2p-copy``
    the same, with the image spread by BitTorrent (libtorrent) from a
    seeder on the origin host to a peer on every host;
``direct``
    thunder agents, every template reading straight from the origin (all
    hosts are children of the origin): lazy, cached per host, no relay;
``thunder``
    thunder agents with the relay tree (k-ary, one child under the origin)
    and copy-on-read caches;
``thunder-prefetch``
    the same, with the image's boot trace in the agents' trace directory:
    each agent starts a trace prefetch as soon as it has created the
    template, ahead of the VMs (the agent's own ``[prefetch]`` path).

The VMs are trace replayers or real QEMU guests (:mod:`.vm`). Bytes per
link come from the cluster's link counters; the origin's are what its link
sent.
"""

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from thunder_lab.bench import http
from thunder_lab.bench import metrics
from thunder_lab.bench import torrent
from thunder_lab.bench import vm as vm_mod
from thunder_agent import exception
from thunder_lab import exception as lab_exception
from thunder_lab.emulation import cluster as cluster_mod
from thunder_lab import trace_recorder

MIB = 1 << 20
# Fan-out that puts every host directly under the origin.
DIRECT_FAN_OUT = 1024
# Ports of the per-storm origin servers on the origin host.
ORIGIN_PORT_BASE = 10900


@dataclasses.dataclass
class BenchConfig:
    image: str
    trace: object
    hosts: list
    vms_per_host: int = 1
    bandwidth_mbit: float = 100.0
    modes: tuple = metrics.MODES
    vm: str = 'replay'
    fan_out: int = 2
    chunk_bytes: int = 65536
    prefetch_concurrency: int = 4
    vm_timeout: float = 900.0
    workdir: str = '/tmp'
    progress: object = None

    def validate(self):
        if not isinstance(self.image, str) or not os.path.isfile(self.image):
            raise exception.InvalidInput(reason='no image file %r'
                                                % (self.image,))
        if not self.hosts or any(isinstance(h, bool) or not isinstance(
                h, int) or not 1 <= h <= 250 for h in self.hosts):
            raise exception.InvalidInput(
                reason='hosts must be integers in 1..250, got %r'
                       % (self.hosts,))
        if not 1 <= self.vms_per_host <= 64:
            raise exception.InvalidInput(reason='vms per host: 1..64')
        if not 0.1 <= self.bandwidth_mbit <= 32000:
            raise exception.InvalidInput(
                reason='bandwidth must be 0.1..32000 Mbit/s')
        unknown = set(self.modes) - set(metrics.MODES)
        if unknown or not self.modes:
            raise exception.InvalidInput(
                reason='modes must be among %s, got %s'
                       % (', '.join(metrics.MODES), sorted(unknown)))
        if self.vm not in ('replay', 'real'):
            raise exception.InvalidInput(reason='vm must be replay or real')
        if self.fan_out < 1:
            raise exception.InvalidInput(reason='fan_out must be >= 1')

    @property
    def bandwidth_bps(self):
        return self.bandwidth_mbit * 1e6


class Progress:
    """The live progress line of one storm."""

    def __init__(self, label, total_vms, counters, out=None, interval=0.5):
        self.label = label
        self.total = total_vms
        self.counters = counters
        self.out = out or sys.stderr
        self.tty = hasattr(self.out, 'isatty') and self.out.isatty()
        self.interval = interval if self.tty else 5.0
        self.done = 0
        self.failed = 0
        self.phase = {}
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.base = None

    def __enter__(self):
        self.base = self._origin_sent()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._print(final=True)

    def set_phase(self, host, phase):
        with self._lock:
            self.phase[host] = phase

    def vm_done(self, ok):
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1

    def _origin_sent(self):
        try:
            return self.counters()['origin'].tx_bytes
        except Exception:
            return None

    def line(self):
        sent = self._origin_sent()
        origin = ('%.1f' % ((sent - self.base) / MIB)
                  if sent is not None and self.base is not None else '?')
        with self._lock:
            phases = {}
            for phase in self.phase.values():
                phases[phase] = phases.get(phase, 0) + 1
            detail = ' '.join('%s:%d' % kv for kv in sorted(phases.items()))
            return ('[%s] %6.1fs  VMs booted %d/%d%s  origin sent %s MiB  '
                    '%s' % (self.label, time.monotonic() - self.start,
                            self.done, self.total,
                            ' (%d failed)' % self.failed
                            if self.failed else '', origin, detail))

    def _print(self, final=False):
        text = self.line()
        if self.tty:
            self.out.write('\r\033[K' + text + ('\n' if final else ''))
        else:
            self.out.write(text + '\n')
        self.out.flush()

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._print()


class Storm:
    """Bookkeeping of one (mode, H) run."""

    def __init__(self, config, mode, hosts, expected):
        self.config = config
        self.mode = mode
        self.hosts = hosts
        self.expected = expected
        self.results = []
        self.errors = []
        self.host_times = {}
        self.prefetch = {}
        self.lock = threading.Lock()
        self.t0 = None
        self.progress = None
        self.trace_path = None

    def elapsed(self):
        return time.monotonic() - self.t0

    def vm_finished(self, result):
        """A VM reported back: its latency counts from the storm's start."""
        done = self.elapsed()
        with self.lock:
            self.results.append((done, result))
            if not result.ok:
                self.errors.append('%s: %s' % (result.name, result.error))
        if self.progress:
            self.progress.vm_done(result.ok)

    def fail(self, where, error, vms=None):
        """*where* (a host, or one VM with vms=1) cannot boot."""
        with self.lock:
            self.errors.append('%s: %s' % (where, error))
        if self.progress:
            for _ in range(self.config.vms_per_host if vms is None
                           else vms):
                self.progress.vm_done(False)


def _threads(targets):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def _join(threads, timeout):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


class HostVMs:
    """The benchmark's end of one host's runner process
    (:mod:`thunder_lab.bench.host_runner`), which runs the host's VMs
    inside the host's network namespace."""

    def __init__(self, storm, host, trace_path, workdir):
        self.storm = storm
        self.host = host
        self.sent = 0
        self.finished = 0
        self.cond = threading.Condition()
        config = storm.config
        self.log_path = os.path.join(workdir, '%s.runner.log' % host.name)
        with open(self.log_path, 'ab') as log:
            self.proc = host.popen(
                [sys.executable, '-m', 'thunder_lab.bench.host_runner',
                 '--trace', trace_path, '--expected', storm.expected,
                 '--vm', config.vm, '--timeout', str(config.vm_timeout),
                 '--workdir', workdir],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True)
        line = self.proc.stdout.readline()
        if not line.startswith('{"event": "ready"'):
            raise lab_exception.BenchmarkFailed(
                reason='VM runner on %s did not start: %s %s'
                       % (host.name, line, self._log_tail()))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _log_tail(self):
        try:
            with open(self.log_path, errors='replace') as f:
                return f.read()[-1500:]
        except OSError:
            return ''

    def _read(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get('event') == 'vm':
                del event['event']
                self.storm.vm_finished(vm_mod.VMResult(**event))
                with self.cond:
                    self.finished += 1
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def _send(self, **command):
        self.proc.stdin.write(json.dumps(command) + '\n')
        self.proc.stdin.flush()

    def boot(self, name, connection_info):
        with self.cond:
            self.sent += 1
        self._send(cmd='vm', name=name, connection_info=connection_info)

    def wait(self, timeout):
        """Until every VM sent so far reported; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.finished < self.sent:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and \
                        not self.reader.is_alive():
                    return False
                self.cond.wait(min(left, 1.0))
        return True

    def close(self, timeout=60):
        """End of input: the runner finishes its VMs and exits."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)
        lost = self.sent - self.finished
        if lost > 0:
            self.storm.fail(self.host.name, 'runner lost %d VM(s): %s'
                            % (lost, self._log_tail()), vms=lost)
            with self.cond:
                self.finished = self.sent


def _start_runners(storm, hosts, workdir):
    runners = {}
    try:
        for host in hosts:
            runners[host.name] = HostVMs(storm, host, storm.trace_path,
                                         workdir)
    except Exception:
        for runner in runners.values():
            runner.close(5)
        raise
    return runners


# -- modes --

def _run_copy(storm, cluster, workdir):
    """full-copy and p2p-copy: whole image to every host, then boot."""
    config = storm.config
    server = swarm = None
    runners = {}
    copies = os.path.join(workdir, 'copies')
    try:
        if storm.mode == 'full-copy':
            server = http.HttpOrigin(cluster.origin, config.image,
                                     workdir).start()
        else:
            swarm = torrent.Swarm(cluster, config.image, workdir).seed()
            # Every peer listens (paused) before the storm starts.
            for host in cluster.hosts:
                swarm.fetch(host, os.path.join(copies, host.name))
        runners = _start_runners(storm, cluster.hosts, workdir)
        before = cluster.counters()
        storm.t0 = time.monotonic()
        if swarm is not None:
            swarm.go()

        def host_job(host):
            directory = os.path.join(copies, host.name)
            storm.progress.set_phase(host.name, 'copying')
            try:
                if server is not None:
                    local = os.path.join(directory,
                                         os.path.basename(config.image))
                    http.download(host, server.url, local,
                                  timeout=config.vm_timeout)
                else:
                    swarm.wait_complete(host)
                    local = swarm.path_on(directory)
            except Exception as e:
                storm.fail(host.name, 'copy: %s' % e)
                return
            storm.host_times[host.name] = storm.elapsed()
            storm.progress.set_phase(host.name, 'booting')
            runner = runners[host.name]
            for index in range(config.vms_per_host):
                name = '%s-vm%d' % (host.name, index)
                try:
                    conn = vm_mod.local_overlay(
                        local, os.path.join(workdir, 'vms'), name)
                except Exception as e:
                    storm.fail(name, 'disk: %s' % e, vms=1)
                    continue
                runner.boot(name, conn)
            runner.wait(config.vm_timeout)
            storm.progress.set_phase(host.name, 'done')

        threads = _threads([lambda h=h: host_job(h) for h in cluster.hosts])
        if not _join(threads, config.vm_timeout * 2):
            storm.errors.append('storm timed out')
        storm_s = storm.elapsed()
        after = cluster.counters()
    finally:
        for runner in runners.values():
            runner.close()
        if server is not None:
            server.stop()
        if swarm is not None:
            swarm.stop()
        shutil.rmtree(copies, ignore_errors=True)
    return storm_s, metrics.link_bytes(before, after), {}


def _run_thunder(storm, tc, image_id, workdir):
    """direct, thunder, thunder-prefetch: templates for a new image id,
    snapshots, VMs. The origin host serves the image under that id (relay
    trees identify the image by the origin's export name) from a second
    origin server, next to the cluster's own."""
    from thunder_lab.emulation import thunder_cluster
    config = storm.config
    origin = thunder_cluster.OriginProcess(
        tc.cluster.origin, config.image, 'raw', image_id,
        _next_origin_port(), os.path.join(workdir, 'origin'),
        tls_dir=tc.credentials(tc.cluster.origin)).start()
    try:
        return _storm_on_agents(storm, tc, origin, image_id, workdir)
    finally:
        origin.stop()


_origin_ports = itertools.count(ORIGIN_PORT_BASE)


def _next_origin_port():
    return next(_origin_ports)


def _storm_on_agents(storm, tc, origin, image_id, workdir):
    config = storm.config
    runners = _start_runners(storm, tc.cluster.hosts, workdir)
    try:
        storm.t0 = time.monotonic()
        before = tc.cluster.counters()

        def host_job(name):
            agent = tc.agents[name]
            runner = runners[name]
            storm.progress.set_phase(name, 'template')
            try:
                agent.client.prepare_template(
                    image_id, origin.connection(), tc.size, 'raw')
            except Exception as e:
                storm.fail(name, 'prepare_template: %s' % e)
                return
            storm.host_times[name] = storm.elapsed()
            storm.progress.set_phase(name, 'booting')
            for index in range(config.vms_per_host):
                vm_name = '%s-vm%d' % (name, index)
                try:
                    conn = agent.client.create_snapshot(image_id,
                                                        str(uuid.uuid4()))
                except Exception as e:
                    storm.fail(vm_name, 'create_snapshot: %s' % e, vms=1)
                    continue
                runner.boot(vm_name, conn)
            runner.wait(config.vm_timeout)
            storm.progress.set_phase(name, 'done')
            if storm.mode == 'thunder-prefetch':
                storm.prefetch[name] = _agent_prefetch(agent, image_id)

        threads = _threads([lambda n=n: host_job(n)
                            for n in sorted(tc.agents)])
        if not _join(threads, config.vm_timeout * 2):
            storm.errors.append('storm timed out')
        storm_s = storm.elapsed()
        after = tc.cluster.counters()
    finally:
        for runner in runners.values():
            runner.close()
    extra = {}
    try:
        tree = tc.coordinator.client.get_tree(image_id)
        extra['tree_height'] = tree.get('height')
        extra['tree'] = {node: (entry.get('parents') or [None])[0]
                         for node, entry in tree.get('nodes', {}).items()}
    except Exception as e:
        extra['tree_height'] = None
        storm.errors.append('tree: %s' % e)
    if storm.prefetch:
        extra['prefetch'] = dict(sorted(storm.prefetch.items()))
    return storm_s, metrics.link_bytes(before, after), extra


def _agent_prefetch(agent, image_id):
    """What the agent's own trace prefetch of the template did."""
    try:
        for template in agent.client.get_status()['templates']:
            if template['image_id'] == image_id:
                status = template.get('prefetch') or {}
                jobs = status.get('jobs') or [{}]
                return {'state': status.get('state'),
                        'bytes_done': status.get('bytes_done'),
                        'bytes_total': status.get('bytes_total'),
                        'elapsed_s': jobs[0].get('elapsed_s'),
                        'method': jobs[0].get('method'),
                        'error': jobs[0].get('error')}
    except Exception as e:
        return {'state': 'unknown', 'error': str(e)}
    return {'state': 'none'}


# -- the benchmark --


@dataclasses.dataclass
class _Testbed:
    cluster: object             # the emulated network (cluster.Cluster)
    tc: object                  # ThunderCluster, when agents run
    traces: str                 # the agents' trace directory


class Bench:
    """Runs the configured storms; :meth:`run` returns the records."""

    def __init__(self, config):
        config.validate()
        self.config = config
        self.say = config.progress or (lambda message: None)
        self.records = []
        self.rabbit = None
        self.warm_boot_s = None
        self.expected = None

    def prepare(self):
        config = self.config
        from thunder_agent import trace as trace_mod
        size, sha = trace_recorder.image_digest(config.image, 'raw')
        trace_mod.check_image(config.trace, size, sha)
        self.image_bytes = size
        if config.vm == 'replay':
            self.expected = vm_mod.expected_digest(config.image,
                                                   config.trace)
        else:
            from thunder_lab.guest import vm as guest
            self.expected = guest.expected_data_sha(config.image)
        self.working_set = config.trace.unique_bytes()
        # The hosts' VM runners read the trace from a file.
        self.trace_path = config.trace.save(
            os.path.join(config.workdir, 'boot.trace'))
        self.say('measuring one VM alone on a warm local disk')
        self.warm_boot_s = self._warm_boot()
        self.say('warm boot: %.2f s' % self.warm_boot_s)

    def _warm_boot(self):
        config = self.config
        directory = os.path.join(config.workdir, 'warm')
        conn = vm_mod.local_overlay(config.image, directory, 'warm')
        try:
            if config.vm == 'replay':
                result = vm_mod.run_replay('warm', conn, config.trace,
                                           self.expected)
            else:
                result = vm_mod.run_real('warm', conn, self.expected,
                                         timeout=config.vm_timeout,
                                         workdir=directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if not result.ok:
            raise lab_exception.BenchmarkFailed(
                reason='a VM does not boot from a local copy: %s'
                       % result.error)
        return result.boot_s

    def run(self):
        self.prepare()
        needs_agents = set(self.config.modes) & set(metrics.AGENT_MODES)
        try:
            if needs_agents:
                from thunder_lab.emulation import rabbitmq
                self.say('starting a private RabbitMQ on loopback')
                self.rabbit = rabbitmq.RabbitMQ().start()
            for hosts in self.config.hosts:
                self._run_hosts(hosts)
        finally:
            if self.rabbit is not None:
                self.rabbit.stop()
                self.rabbit = None
        return self.records

    def _run_hosts(self, hosts):
        """Every mode at *hosts*: the copies and the relay-tree modes share
        one cluster (with its agents, when a relay-tree mode runs);
        ``direct`` needs a coordinator of its own (all under the origin).
        Each storm uses a new image id, so no cache carries over."""
        modes = self.config.modes
        own = ('direct', metrics.PLAIN_MODE)
        shared = [m for m in modes if m not in own]
        results = {}
        workdir = os.path.join(self.config.workdir, 'h%d-%s' % (
            hosts, uuid.uuid4().hex[:6]))
        os.makedirs(workdir)
        try:
            if shared:
                agents = bool(set(shared) & {'thunder', 'thunder-prefetch'})
                with self._testbed(hosts, workdir, agents) as bed:
                    for mode in shared:
                        results[mode] = self.run_one(mode, hosts, bed)
            if 'direct' in modes:
                with self._testbed(hosts, workdir, True, direct=True) as bed:
                    results['direct'] = self.run_one('direct', hosts, bed)
            if metrics.PLAIN_MODE in modes:
                with self._testbed(hosts, workdir, True, tls=False) as bed:
                    results[metrics.PLAIN_MODE] = self.run_one(
                        metrics.PLAIN_MODE, hosts, bed)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.records += [results[m] for m in modes]

    @contextlib.contextmanager
    def _testbed(self, hosts, workdir, agents, direct=False, tls=True):
        config = self.config
        label = 'H=%d%s%s' % (hosts, ' (all under the origin)' if direct
                              else '', '' if tls else ' (security off)')
        if not agents:
            self.say('%s: starting the cluster' % label)
            with cluster_mod.Cluster(
                    hosts=hosts,
                    bandwidth_bps=int(config.bandwidth_bps)) as cluster:
                yield _Testbed(cluster, None, None)
            return
        from thunder_lab.emulation import thunder_cluster
        self.say('%s: starting the cluster with %d agents'
                 % (label, hosts))
        options = {}
        fan_out = config.fan_out
        if direct:
            fan_out = DIRECT_FAN_OUT
            options = {'coordinator': {'origin_fan_out': DIRECT_FAN_OUT}}
        # An agent prefetches an image whose trace is in its trace
        # directory: thunder-prefetch puts it there, under its image id.
        traces = tempfile.mkdtemp(prefix='traces-', dir=workdir)
        agent_options = {
            'cache': {'cluster_size': config.chunk_bytes},
            'prefetch': {'trace_dir': traces,
                         'concurrency': config.prefetch_concurrency}}
        with thunder_cluster.ThunderCluster(
                hosts=hosts, image=config.image,
                bandwidth_mbit=config.bandwidth_mbit, fan_out=fan_out,
                coordinator_options=options, agent_options=agent_options,
                rabbit=self.rabbit, tls=tls) as tc:
            yield _Testbed(tc.cluster, tc, traces)

    def run_one(self, mode, hosts, bed):
        config = self.config
        workdir = os.path.join(config.workdir,
                               '%s-%d-%s' % (mode, hosts,
                                             uuid.uuid4().hex[:6]))
        os.makedirs(workdir)
        storm = Storm(config, mode, hosts, self.expected)
        storm.trace_path = self.trace_path
        label = '%s H=%d' % (mode, hosts)
        total = hosts * config.vms_per_host
        cpu_before = metrics.cpu_times()
        try:
            with Progress(label, total, bed.cluster.counters) as p:
                storm.progress = p
                if mode in ('full-copy', 'p2p-copy'):
                    storm_s, links, extra = _run_copy(storm, bed.cluster,
                                                      workdir)
                else:
                    image_id = str(uuid.uuid4())
                    if mode == 'thunder-prefetch':
                        shutil.copyfile(self.trace_path, os.path.join(
                            bed.traces, image_id + '.trace'))
                    cpu_s = _data_plane_cpu_s(bed.tc)
                    storm_s, links, extra = _run_thunder(
                        storm, bed.tc, image_id, workdir)
                    extra.update(_data_plane_cost(
                        _data_plane_cpu_s(bed.tc) - cpu_s, links))
            extra['cpu_busy'] = metrics.cpu_busy(cpu_before,
                                                 metrics.cpu_times())
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return self._record(storm, storm_s, links, extra)

    def _record(self, storm, storm_s, links, extra):
        config = self.config
        latencies = sorted(done for done, _ in storm.results)
        failed = sum(1 for _, r in storm.results if not r.ok)
        missing = storm.hosts * config.vms_per_host - len(storm.results)
        depth = metrics.kary_depth(storm.hosts, config.fan_out)
        if latencies and not missing:
            # Start to the last VM booted (not to the end of bookkeeping).
            storm_s = latencies[-1]
        record = {
            'mode': storm.mode,
            'hosts': storm.hosts,
            'vms_per_host': config.vms_per_host,
            'vms': storm.hosts * config.vms_per_host,
            'vm': config.vm,
            'bandwidth_mbit': config.bandwidth_mbit,
            'link_burst_s': cluster_mod.SHAPER_BURST_S,
            # Every emulated host runs on this machine's processors.
            'cpu_count': os.cpu_count(),
            'fan_out': (config.fan_out if storm.mode != 'direct'
                        else DIRECT_FAN_OUT),
            'storm_s': round(storm_s, 3),
            'p50_s': _round(metrics.percentile(latencies, 50)),
            'p99_s': _round(metrics.percentile(latencies, 99)),
            'vm_latencies_s': [round(x, 3) for x in latencies],
            'boot_s': [round(r.boot_s, 3) for _, r in storm.results],
            'vm_detail': [{'name': r.name, 'host': r.name.split('-vm')[0],
                           'latency_s': round(done, 3),
                           'boot_s': round(r.boot_s, 3), 'ok': r.ok}
                          for done, r in sorted(storm.results,
                                                key=lambda x: x[0])],
            'host_ready_s': {h: round(t, 3)
                             for h, t in sorted(storm.host_times.items())},
            'origin_bytes': links['origin'][0],
            'max_link_bytes': metrics.max_link_bytes(links),
            'link_bytes': links,
            'image_bytes': self.image_bytes,
            'working_set_bytes': self.working_set,
            'working_set_cluster_bytes': config.trace.unique_bytes(
                config.chunk_bytes),
            'chunk_bytes': config.chunk_bytes,
            'depth': depth,
            'warm_boot_s': round(self.warm_boot_s, 3),
            'bound_s': round(metrics.bound_s(
                self.warm_boot_s, self.working_set, config.bandwidth_bps,
                depth, config.chunk_bytes), 3),
            'origin_bound_bytes': self.working_set,
            'checksums_ok': failed == 0 and missing == 0,
            'vms_failed': failed + missing,
            'errors': storm.errors[:20],
        }
        record.update(extra)
        return record


def _data_plane_cpu_s(tc):
    """CPU seconds the agents' data planes (template daemons, relay
    exporters, forwarders, verifiers: the processes of their pid files)
    used so far."""
    return metrics.process_cpu_s(
        [pid for agent in tc.agents.values()
         for pid in agent.data_plane_pids()])


def _data_plane_cost(cpu_s, links):
    """What relaying cost the data planes: CPU seconds, and CPU seconds
    per GiB sent over all links (origin and relays)."""
    sent = sum(tx for tx, _ in links.values())
    return {'data_plane_cpu_s': round(cpu_s, 2),
            'cpu_s_per_gib': (round(cpu_s / (sent / (1 << 30)), 2)
                              if sent else None)}


def _round(value):
    return None if value is None else round(value, 3)
