"""``thunder-bench-agent``: concurrent prepares on one real thunder-agent.

Starts a private RabbitMQ, an NBD origin serving one image file under one
export name per image id, and one thunder-agent with relay enabled and a
coordinator topic nobody serves; then runs the scenarios (``alone``: one
prepare; ``distinct``: N prepares of N images at once; ``shared``: N
prepares of one image at once) with Nova's per-call timeout, prints a
table and checks that the agent built one template per image. See
:mod:`thunder_lab.bench.agent_load`.

``--agent-root DIR --agent-python PY`` measures another tree (e.g. the
previous release) with its own interpreter. Exit status: 0 when the
benchmark ran (whatever it measured), 1 when it could not be set up, 2 on
bad arguments.
"""

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings

# The agents' libraries warn about their own dependencies on import; that
# is noise between the progress lines.
warnings.filterwarnings('ignore', message='(?s).*eventlet is deprecated')

from thunder_agent import exception  # noqa: E402
from thunder_lab.bench import agent_load  # noqa: E402
from thunder_lab.emulation import rabbitmq  # noqa: E402


def _say(message):
    print('[%s] %s' % (time.strftime('%H:%M:%S'), message), file=sys.stderr,
          flush=True)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError('%r is not a number' % text)
        if value <= 0:
            raise argparse.ArgumentTypeError('must be positive')
        return value
    return parse


def _scenarios(text):
    names = [s.strip() for s in text.split(',') if s.strip()]
    unknown = [s for s in names if s not in agent_load.SCENARIOS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            'a comma-separated list of distinct scenarios among %s'
            % ', '.join(agent_load.SCENARIOS))
    return names


def _agent_option(text):
    try:
        return agent_load.parse_agent_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _parser():
    parser = argparse.ArgumentParser(
        prog='thunder-bench-agent', description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=_positive(int),
                        default=agent_load.DEFAULT_IMAGES,
                        help='N, concurrent prepares of the distinct and '
                             'shared scenarios (default %d)'
                             % agent_load.DEFAULT_IMAGES)
    parser.add_argument('--image-mib', type=_positive(int),
                        default=agent_load.DEFAULT_IMAGE_MIB,
                        help='size of the image in MiB (default %d)'
                             % agent_load.DEFAULT_IMAGE_MIB)
    parser.add_argument('--timeout', type=_positive(float),
                        default=agent_load.DEFAULT_TIMEOUT,
                        help='per-call RPC timeout in seconds, as Nova\'s; '
                             'a call exceeding it counts as an error '
                             '(default %d)' % agent_load.DEFAULT_TIMEOUT)
    parser.add_argument('--scenarios', type=_scenarios,
                        default=list(agent_load.SCENARIOS),
                        help='scenarios to run, in this order (default %s)'
                             % ','.join(agent_load.SCENARIOS))
    parser.add_argument('--agent-option', type=_agent_option, default=[],
                        action='append', metavar='GROUP.NAME=VALUE',
                        help='an option of the agent\'s config file, e.g. '
                             'relay.join_timeout=3 (repeatable); names in '
                             'thunder\'s groups must exist in the tree '
                             'measured')
    parser.add_argument('--agent-root', metavar='DIR',
                        help='run the agent from this tree (cwd and '
                             'PYTHONPATH), e.g. a previous release')
    parser.add_argument('--agent-python', metavar='PY',
                        help='interpreter of the agent (default: this one)')
    parser.add_argument('--no-verify', action='store_true',
                        help='do not read one snapshot per scenario back '
                             'through the data plane')
    parser.add_argument('--agent-log', metavar='FILE',
                        help='keep a copy of the agent\'s log here')
    parser.add_argument('--json', metavar='FILE',
                        help='write the figures as JSON')
    return parser


def _terminate(signum, frame):
    # Unwinds like Ctrl-C, so that the benchmark's cleanup runs.
    raise KeyboardInterrupt('signal %d' % signum)


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.agent_root and not os.path.isdir(
            os.path.join(args.agent_root, 'thunder_agent')):
        print('Error: %s has no thunder_agent package' % args.agent_root,
              file=sys.stderr)
        return 2
    warnings.simplefilter('ignore', DeprecationWarning)
    # N concurrent calls take N connections of this process's pool (30
    # pooled, more made on demand); each one past the pool logs a warning
    # that says nothing about the agent.
    logging.getLogger('oslo.messaging._drivers.pool').setLevel(logging.ERROR)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        bench = agent_load.Bench(
            images=args.images, image_mib=args.image_mib,
            timeout=args.timeout, scenarios=args.scenarios,
            options=args.agent_option, agent_root=args.agent_root,
            agent_python=args.agent_python, verify=not args.no_verify,
            agent_log=args.agent_log, say=_say)
        result = bench.run()
    except KeyboardInterrupt:
        print('Interrupted; everything was cleaned up', file=sys.stderr)
        return 130
    except (agent_load.BenchError, rabbitmq.RabbitMQUnavailable,
            exception.ThunderException, OSError) as e:
        print('Error: %s' % e, file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    result['argv'] = sys.argv[1:] if argv is None else list(argv)
    print(agent_load.format_table(result))
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2, sort_keys=True)
            f.write('\n')
        print('figures written to %s' % args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
