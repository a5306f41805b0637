"""``thunder-origin``: serve an image file read-only over NBD.

Prints the origin as the agent's ``origin`` argument (JSON) once it serves,
and serves until SIGINT or SIGTERM, which stop the server. To serve inside
a network namespace, run it there (``ip netns exec NS thunder-origin ...``):
the listening socket is made where the command runs.

On TCP the server requires TLS: ``--tls-certificates-dir`` (default the
agent's ``[tls] certificates_dir``) holds the origin's credentials, and
each ``--tls-allow`` glob (default ``CN=*``: any certificate of the
deployment CA) admits the client DNs it matches. ``--no-tls`` serves TCP in
the clear, for a lab only.
"""

import argparse
import json
import logging
import signal
import sys
import threading

from thunder_agent import conf as conf_mod
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


def _default_tls_dir():
    """``[tls] certificates_dir``'s default (no configuration file is
    read: an origin is not an agent)."""
    for opt in conf_mod.tls_opts:
        if opt.dest == 'certificates_dir':
            return opt.default
    return None


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
    parser.add_argument(
        '--tls-certificates-dir', default=_default_tls_dir(),
        help='the origin\'s TLS credentials, in the [tls] '
             'certificates_dir layout (default %(default)s)')
    parser.add_argument(
        '--tls-allow', action='append', metavar='GLOB',
        help='client certificate DNs admitted on TCP, a glob such as '
             'CN=compute-*; repeatable (default CN=*: any node with a '
             'certificate of the deployment CA)')
    parser.add_argument(
        '--no-tls', action='store_true',
        help='serve TCP without TLS: anyone who reaches the port reads '
             'the image (a lab only)')
    args = parser.parse_args(argv)
    if args.max_connections < 1:
        parser.error('--max-connections must be at least 1')
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='thunder-origin: %(message)s')
    tls_dir = None if args.no_tls else args.tls_certificates_dir
    if args.no_tls and args.listen['type'] == 'inet':
        print('thunder-origin: WARNING: --no-tls: %s:%s is served WITHOUT '
              'TLS; anyone who reaches it reads the image'
              % (args.listen['host'], args.listen['port']),
              file=sys.stderr, flush=True)
    # Handlers first: a signal while the server starts must still stop it
    # (its daemon is not our child and would outlive us).
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: done.set())
    try:
        server = origin.OriginServer(
            args.image, args.format, args.export, args.listen,
            args.run_path, max_connections=args.max_connections,
            tls_dir=tls_dir,
            tls_allow=tuple(args.tls_allow or origin.DEFAULT_TLS_ALLOW)
        ).start()
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
