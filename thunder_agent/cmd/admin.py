"""``thunder-admin``: talk to a thunder agent over RPC.

    thunder-admin --config-file /etc/nova-thunder/thunder-agent.conf \\
        status [--host HOST]
    thunder-admin ... prepare IMAGE_ID ORIGIN_JSON SIZE [--format raw]
    thunder-admin ... snapshot IMAGE_ID INSTANCE_ID
    thunder-admin ... delete-snapshot INSTANCE_ID
    thunder-admin ... release IMAGE_ID
    thunder-admin ... gc [--max-idle SECONDS]
    thunder-admin ... prefetch IMAGE_ID [--mode trace|full] [--rate-mb N]
"""

import argparse
import json
import sys

from oslo_config import cfg

from thunder_agent import conf as agent_conf
from thunder_agent import exception
from thunder_agent import rpc
from thunder_agent.rpc import api


def _parser():
    p = argparse.ArgumentParser(prog='thunder-admin',
                                description='Talk to a thunder agent.')
    p.add_argument('--host', help='agent host (default: [DEFAULT] host)')
    p.add_argument('--timeout', type=int, default=120)
    sub = p.add_subparsers(dest='command', required=True)
    sub.add_parser('status')
    s = sub.add_parser('prepare')
    s.add_argument('image_id')
    s.add_argument('origin', type=json.loads, help='origin as JSON')
    s.add_argument('size', type=int)
    s.add_argument('--format', default='raw')
    s = sub.add_parser('snapshot')
    s.add_argument('image_id')
    s.add_argument('instance_id')
    s = sub.add_parser('delete-snapshot')
    s.add_argument('instance_id')
    s = sub.add_parser('release')
    s.add_argument('image_id')
    s = sub.add_parser('gc')
    s.add_argument('--max-idle', type=int)
    s = sub.add_parser('prefetch')
    s.add_argument('image_id')
    s.add_argument('--mode', choices=['trace', 'full'], default='full')
    s.add_argument('--rate-mb', type=float)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # oslo.config takes --config-file/--config-dir; the rest is ours.
    conf = agent_conf.register_opts(cfg.CONF)
    ours = _parser().parse_args(
        [a for i, a in enumerate(argv) if not _is_conf_arg(argv, i)])
    conf([a for i, a in enumerate(argv) if _is_conf_arg(argv, i)],
         project='thunder-agent',
         default_config_files=cfg.find_config_files('nova-thunder',
                                                    'thunder-agent'))
    client = api.AgentAPI(rpc.get_transport(conf), topic=conf.agent.topic,
                          timeout=ours.timeout)
    host = ours.host or conf.host
    try:
        if ours.command == 'status':
            result = client.get_status(host)
        elif ours.command == 'prepare':
            result = client.prepare_template(host, ours.image_id, ours.origin,
                                             ours.size, ours.format)
        elif ours.command == 'snapshot':
            result = client.create_snapshot(host, ours.image_id,
                                            ours.instance_id)
        elif ours.command == 'delete-snapshot':
            result = client.delete_snapshot(host, ours.instance_id)
        elif ours.command == 'release':
            result = client.release_template(host, ours.image_id)
        elif ours.command == 'prefetch':
            result = client.prefetch(host, ours.image_id, ours.mode,
                                     ours.rate_mb)
        else:
            result = client.collect_garbage(host, ours.max_idle)
    except exception.ThunderException as e:
        print('thunder-admin: %s: %s' % (type(e).__name__, e),
              file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _is_conf_arg(argv, i):
    a = argv[i]
    if a.startswith(('--config-file', '--config-dir')):
        return True
    return i > 0 and argv[i - 1] in ('--config-file', '--config-dir')


if __name__ == '__main__':
    sys.exit(main())
