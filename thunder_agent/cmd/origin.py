"""``thunder-origin``: serve an image file read-only over NBD.

Prints the origin as the agent's ``origin`` argument (JSON) once it serves,
and serves until SIGINT or SIGTERM, which stop the server. To serve inside
a network namespace, run it there (``ip netns exec NS thunder-origin ...``):
the listening socket is made where the command runs.
"""

import argparse
import json
import signal
import sys
import threading

from thunder_agent import exception
from thunder_agent import origin


def _listen(value):
    if value.startswith('unix:'):
        return {'type': 'unix', 'path': value[5:]}
    if value.startswith('tcp:'):
        host, _, port = value[4:].rpartition(':')
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError('expected tcp:HOST:PORT')
        return {'type': 'inet', 'host': host.strip('[]'), 'port': int(port)}
    raise argparse.ArgumentTypeError('expected unix:PATH or tcp:HOST:PORT')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image', required=True, help='image file')
    parser.add_argument('--format', default='raw', choices=['raw', 'qcow2'])
    parser.add_argument('--export', required=True,
                        help='NBD export name (usually the image id)')
    parser.add_argument('--listen', required=True, type=_listen,
                        help='unix:PATH or tcp:HOST:PORT')
    parser.add_argument('--run-path', default='/run/thunder-origin')
    parser.add_argument(
        '--max-connections', type=int,
        default=origin.DEFAULT_MAX_CONNECTIONS,
        help='NBD clients served at once (default %(default)s): one per '
             'host reading the origin directly; one more waits unanswered '
             'until one leaves')
    args = parser.parse_args(argv)
    if args.max_connections < 1:
        parser.error('--max-connections must be at least 1')
    # Handlers first: a signal while the server starts must still stop it
    # (its daemon is not our child and would outlive us).
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: done.set())
    try:
        server = origin.OriginServer(
            args.image, args.format, args.export, args.listen,
            args.run_path, max_connections=args.max_connections).start()
    except exception.ThunderException as e:
        print('thunder-origin: %s' % e, file=sys.stderr)
        return 2
    if not done.is_set():
        print(json.dumps(server.connection()), flush=True)
        done.wait()
    server.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
