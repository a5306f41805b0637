"""Peer-to-peer full copy with BitTorrent (libtorrent), as Xen's image
distribution did: a seeder on the origin host, one peer per compute host,
no tracker and no DHT: every peer is told all the others' addresses.

The processes run inside the hosts' namespaces::

    python -m thunder_lab.bench.torrent seed  --torrent T --dir D \\
        --listen ADDR:PORT
    python -m thunder_lab.bench.torrent fetch --torrent T --dir D \\
        --listen ADDR:PORT --peer ADDR:PORT ...

Each prints JSON lines on stdout: ``{"event": "ready"}`` once listening,
and a fetching peer ``{"event": "complete", "seconds": S}`` once it holds
the whole file. A fetching peer starts paused and begins when it reads
``go`` on stdin, so that every peer starts with the storm. Peers keep
seeding to the others until terminated.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from thunder_lab import exception as lab_exception

PORT = 6881
PIECE_SIZE = 256 * 1024


def _lt():
    try:
        import libtorrent
    except ImportError:
        raise lab_exception.BenchmarkFailed(
            reason='the libtorrent Python module is missing: pip install '
                   'libtorrent (test-requirements.txt)')
    return libtorrent


def make_torrent(image_path, torrent_path, piece_size=PIECE_SIZE):
    """Write a v1 .torrent of one file."""
    lt = _lt()
    image_path = os.path.abspath(image_path)
    files = lt.list_files(image_path)
    creator = lt.create_torrent(files, piece_size,
                                lt.create_torrent.v1_only)
    creator.set_creator('thunder-bench')
    lt.set_piece_hashes(creator, os.path.dirname(image_path))
    with open(torrent_path, 'wb') as f:
        f.write(lt.bencode(creator.generate()))
    return torrent_path


def _session(lt, listen):
    return lt.session({
        'listen_interfaces': listen,
        'enable_dht': False, 'enable_lsd': False, 'enable_upnp': False,
        'enable_natpmp': False,
        # TCP only, like every other mode of the benchmark.
        'enable_incoming_utp': False, 'enable_outgoing_utp': False,
        'allow_multiple_connections_per_ip': True,
        'user_agent': 'thunder-bench',
        'alert_mask': 0,
    })


def _emit(**event):
    print(json.dumps(event), flush=True)


def _serve(args):
    lt = _lt()
    session = _session(lt, args.listen)
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(args.torrent)
    params.save_path = args.dir
    params.flags &= ~lt.torrent_flags.auto_managed
    params.flags &= ~lt.torrent_flags.paused
    if args.command == 'seed':
        # The data is known to be complete: no hash check.
        params.flags |= lt.torrent_flags.seed_mode
    else:
        # Nothing moves before the storm starts (a "go" line on stdin).
        params.flags |= lt.torrent_flags.paused
    handle = session.add_torrent(params)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(True))
    peers = [_address(p) for p in args.peer]
    _emit(event='ready')
    if args.command == 'fetch':
        if sys.stdin.readline().strip() != 'go':
            return 1
        handle.resume()
    start = time.monotonic()
    complete = args.command == 'seed'
    last_connect = 0
    while not stopping:
        status = handle.status()
        if not complete and status.is_seeding:
            complete = True
            _emit(event='complete', seconds=time.monotonic() - start,
                  downloaded=status.total_payload_download)
        if not complete and time.monotonic() - last_connect > 1:
            # Peers start at about the same time: keep knocking until the
            # swarm has formed.
            for peer in peers:
                handle.connect_peer(peer)
            last_connect = time.monotonic()
        time.sleep(0.05)
    return 0


def _address(text):
    host, _, port = text.rpartition(':')
    return host, int(port)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='thunder_lab.bench.torrent')
    parser.add_argument('command', choices=('seed', 'fetch'))
    parser.add_argument('--torrent', required=True)
    parser.add_argument('--dir', required=True)
    parser.add_argument('--listen', required=True, help='ADDRESS:PORT')
    parser.add_argument('--peer', action='append', default=[],
                        help='ADDRESS:PORT of another peer (repeatable)')
    args = parser.parse_args(argv)
    return _serve(args)


class Swarm:
    """A seeder on the origin host and a peer on each compute host."""

    def __init__(self, cluster, image_path, workdir):
        self.cluster = cluster
        self.image_path = os.path.abspath(image_path)
        self.workdir = workdir
        self.torrent = os.path.join(workdir, 'image.torrent')
        self.procs = {}

    def _start(self, host, command, directory, peers=()):
        argv = [sys.executable, '-m', 'thunder_lab.bench.torrent',
                command, '--torrent', self.torrent, '--dir', directory,
                '--listen', '%s:%d' % (host.address, PORT)]
        for peer in peers:
            argv += ['--peer', '%s:%d' % (peer.address, PORT)]
        log = os.path.join(self.workdir, '%s.torrent.log' % host.name)
        with open(log, 'ab') as stderr:
            proc = host.popen(argv, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=stderr,
                              text=True)
        proc.log_path = log
        self.procs[host.name] = proc
        return proc

    def seed(self):
        _lt()
        make_torrent(self.image_path, self.torrent)
        proc = self._start(self.cluster.origin, 'seed',
                           os.path.dirname(self.image_path))
        self._expect(proc, 'ready', 'origin')
        return self

    def fetch(self, host, directory):
        """Start the peer of *host*; returns its process (see
        :meth:`wait_complete`)."""
        os.makedirs(directory, exist_ok=True)
        others = [self.cluster.origin] + [h for h in self.cluster.hosts
                                          if h is not host]
        proc = self._start(host, 'fetch', directory, others)
        self._expect(proc, 'ready', host.name)
        return proc

    def go(self):
        """Start every fetching peer at once."""
        for name, proc in self.procs.items():
            if name != self.cluster.origin.name:
                proc.stdin.write('go\n')
                proc.stdin.flush()

    def wait_complete(self, host):
        return self._expect(self.procs[host.name], 'complete', host.name)

    def path_on(self, directory):
        return os.path.join(directory, os.path.basename(self.image_path))

    @staticmethod
    def _expect(proc, event, name):
        line = proc.stdout.readline()
        try:
            got = json.loads(line)
        except ValueError:
            got = {}
        if got.get('event') != event:
            err = ''
            if proc.poll() is not None:
                with open(proc.log_path, errors='replace') as f:
                    err = f.read()[-1500:]
            raise lab_exception.BenchmarkFailed(
                reason='BitTorrent peer on %s: expected %s, got %r %s'
                       % (name, event, line, err))
        return got

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        self.procs = {}


if __name__ == '__main__':
    sys.exit(main())
