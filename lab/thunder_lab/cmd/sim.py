"""``thunder-sim``: the boot-storm simulator.

``thunder-sim run`` simulates storms at any scale, e.g. 10,000 hosts on
10 Gbit/s links booting a 10 GiB image whose boot reads 5 % of it::

    thunder-sim run --hosts 10000 --bandwidth-mbit 10000 --image-gib 10 \\
        --working-set 0.05

The boot is a recorded trace (default: the test image's, see
``thunder-trace record --test-image``) stretched to the image size.
``thunder-sim compare BENCH.json`` simulates every record of a
``thunder-bench --json`` file and prints the error per metric.
"""

import argparse
import dataclasses
import json
import os
import sys

from thunder_lab.bench import metrics
from thunder_lab.bench import workload as bench_workload
from thunder_agent import exception
from thunder_lab.sim import compare as compare_mod
from thunder_lab.sim import engine
from thunder_lab.sim import model
from thunder_lab.sim import tree as tree_mod
from thunder_agent import trace as trace_mod

MIB = 1 << 20


def _default_trace():
    from thunder_lab.guest import image as guest_image
    path = bench_workload.trace_path(guest_image.default_image_path())
    if not os.path.exists(path):
        raise exception.InvalidInput(
            reason='no trace given and none recorded for the test image: '
                   'run "thunder-trace record --test-image" or pass '
                   '--trace')
    return path


def _modes(text):
    if text == 'all':
        return model.MODES
    modes = tuple(m for m in text.split(',') if m)
    if not modes or any(m not in model.MODES for m in modes):
        raise argparse.ArgumentTypeError('modes: %s or all'
                                         % ', '.join(model.MODES))
    return modes


def _hosts(text):
    try:
        values = [int(v) for v in text.split(',') if v]
    except ValueError:
        raise argparse.ArgumentTypeError('comma-separated integers')
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError('positive integers')
    return values


def _run(args):
    trace = trace_mod.load(args.trace or _default_trace())
    image_bytes = int(args.image_gib * (1 << 30)) if args.image_gib else \
        trace.image_size
    if args.image_gib or args.working_set:
        trace = model.scaled_trace(trace, image_bytes, args.working_set)
    workload = model.Workload(trace, args.chunk, args.max_request_mib * MIB)
    records = []
    for hosts in args.hosts:
        relay_tree = None
        for mode in args.modes:
            config = model.SimConfig(
                mode=mode, hosts=hosts,
                bandwidth_bps=args.bandwidth_mbit * 1e6,
                origin_bandwidth_bps=(args.origin_bandwidth_mbit * 1e6
                                      if args.origin_bandwidth_mbit
                                      else None),
                vms_per_host=args.vms, fan_out=args.fan_out,
                origin_fan_out=args.origin_fan_out, chunk_bytes=args.chunk,
                max_request=args.max_request_mib * MIB,
                request_latency_s=args.request_latency_ms / 1000.0,
                miss_penalty_s=args.miss_penalty_ms / 1000.0,
                hit_penalty_s=args.hit_penalty_ms / 1000.0,
                link_burst_s=args.link_burst_ms / 1000.0,
                setup_s=args.setup_s, vm_start_s=args.vm_start_s,
                prefetch_concurrency=args.prefetch_concurrency,
                p2p_seed_extra=args.p2p_seed_extra,
                lump=not args.no_lump)
            parent_of = None
            if mode in ('thunder', 'thunder-prefetch'):
                # The policy places 10,000 joins in tens of seconds: once.
                if relay_tree is None:
                    relay_tree = tree_mod.build(hosts, config.policy,
                                                config.fan_out,
                                                config.origin_fan_out)
                parent_of = relay_tree
            result = engine.simulate(config, workload, parent_of=parent_of)
            record = result.record()
            record['bandwidth_mbit'] = args.bandwidth_mbit
            record['vms_per_host'] = args.vms
            record['vm'] = 'replay, simulated'
            record['parameters'] = {
                k: v for k, v in dataclasses.asdict(config).items()
                if k not in ('host_setup_s', 'host_vm_start_s')}
            record['checksums_ok'] = True
            records.append(record)
            print('simulated %-16s H=%-6d in %.1f s (%d classes, %d '
                  'events)' % (mode, hosts, result.wall_s, result.classes,
                               result.events), file=sys.stderr, flush=True)
    from thunder_lab.bench import report
    print(report.table(records))
    if args.json:
        report.write_json(records, args.json,
                          {'simulated': True,
                           'trace_summary': trace.summary(args.chunk)})
        print('records written to %s' % args.json)
    if args.plot:
        report.plot(records, args.plot, title='thunder-sim (simulated)')
        print('plot written to %s' % args.plot)
    return 0


def _compare(args):
    from thunder_lab.bench import report
    with open(args.bench) as f:
        document = json.load(f)
    records = document['records'] if isinstance(document, dict) else \
        document
    meta = document.get('meta', {}) if isinstance(document, dict) else {}
    path = args.trace or meta.get('trace')
    if not path:
        raise exception.InvalidInput(
            reason='the benchmark file names no trace; pass --trace')
    trace = trace_mod.load(path)
    problems = [p for p in metrics.check(records) if 'missing' in p]
    if problems:
        raise exception.InvalidInput(reason='; '.join(problems))
    penalties = None
    if args.penalties_ms is not None:
        penalties = tuple(v / 1000.0 for v in args.penalties_ms)
    if args.shared_cpu_cores is not None:
        if args.shared_cpu_cores < 1:
            raise exception.InvalidInput(
                reason='--shared-cpu-cores must be a positive integer')
        for record in records:
            record.setdefault('cpu_count', args.shared_cpu_cores)
    rows, penalties, seed_extra, fitted = compare_mod.compare(
        records, trace, penalties, args.p2p_seed_extra)
    print('per VM read through a template: +%.2f ms, +%.2f ms more on a '
          'miss; p2p seed uploads 1 + %.2f (1 - 1/H) images%s'
          % (penalties[0] * 1000, penalties[1] * 1000, seed_extra,
             ' (fitted on %s)' % ', '.join(
                 '%s H=%d' % (r['mode'], r['hosts'])
                 for r in fitted) if fitted else ''))
    header = '%-16s %4s' % ('mode', 'H')
    for key in compare_mod.METRICS:
        header += '  %22s' % key
    print(header)
    print('%-16s %4s' % ('', '') + '  %22s' % 'bench / sim / error'
          * len(compare_mod.METRICS))
    for row in rows:
        line = '%-16s %4d' % (row['mode'] + ('*' if row['fitted'] else ''),
                              row['hosts'])
        for key in compare_mod.METRICS:
            cell = row[key]
            scale = MIB if key.endswith('bytes') else 1
            error = ('%+5.0f%%' % (100 * cell['error'])
                     if cell['error'] is not None else '    -')
            line += '  %7.1f %7.1f %6s' % (cell['bench'] / scale,
                                           cell['sim'] / scale, error)
        print(line)
    print('(* fitted; bytes in MiB, times in s)')
    worst = compare_mod.summary(rows, args.max_hosts, args.limit)
    for key, value in worst.items():
        if value['max_error'] is None:
            continue
        print('%-15s worst %5.1f %%, mean %5.1f %% over H <= %d: %s'
              % (key, 100 * value['max_error'], 100 * value['mean_error'],
                 args.max_hosts, 'within' if value['within'] else
                 'OUTSIDE %.0f %%' % (100 * args.limit)))
    print('worst error per mode (storm, p50, p99, origin bytes, max link):')
    for mode, errors in sorted(compare_mod.summary_by_mode(
            rows, args.max_hosts).items()):
        print('  %-16s %s' % (mode, '  '.join(
            '%5.1f %%' % (100 * errors[k]) for k in compare_mod.METRICS
            if k in errors)))
    if args.json:
        report.write_json(rows, args.json, {'penalties_s': penalties,
                                            'p2p_seed_extra': seed_extra,
                                            'summary': worst})
    return 0


def _parser():
    parser = argparse.ArgumentParser(prog='thunder-sim',
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    run = sub.add_parser('run', help='simulate storms')
    run.add_argument('--hosts', type=_hosts, default=[10000])
    run.add_argument('--modes', type=_modes, default=model.MODES)
    run.add_argument('--vms', type=int, default=1)
    run.add_argument('--bandwidth-mbit', type=float, default=10000)
    run.add_argument('--origin-bandwidth-mbit', type=float)
    run.add_argument('--image-gib', type=float,
                     help='stretch the trace to an image of this size')
    run.add_argument('--working-set', type=float,
                     help='working-set fraction of the stretched image')
    run.add_argument('--trace', help='boot trace (default: test image)')
    run.add_argument('--fan-out', type=int, default=2)
    run.add_argument('--origin-fan-out', type=int, default=1)
    run.add_argument('--chunk', type=int, default=65536)
    run.add_argument('--max-request-mib', type=int, default=16)
    run.add_argument('--request-latency-ms', type=float, default=0.5,
                     help='delay per NBD request per hop')
    run.add_argument('--hit-penalty-ms', type=float, default=0.0,
                     help='extra delay of a VM read through a template')
    run.add_argument('--miss-penalty-ms', type=float, default=0.0,
                     help='extra delay of a VM read that missed its cache')
    run.add_argument('--p2p-seed-extra', type=float, default=0.0,
                     help='p2p-copy: the seed uploads 1 + X (1 - 1/H) '
                          'images (0: an ideal swarm; libtorrent here: '
                          'about 0.6)')
    run.add_argument('--link-burst-ms', type=float, default=0.0,
                     help='bucket of each link\'s shaper, in ms of its '
                          'rate (thunder-bench\'s links: 10)')
    run.add_argument('--setup-s', type=float, default=0.5,
                     help='template (or download) start after storm start')
    run.add_argument('--vm-start-s', type=float, default=0.3)
    run.add_argument('--prefetch-concurrency', type=int, default=4)
    run.add_argument('--no-lump', action='store_true',
                     help='simulate every host (slow; for checks)')
    run.add_argument('--json')
    run.add_argument('--plot')
    run.set_defaults(func=_run)
    cmp = sub.add_parser('compare', help='simulate a benchmark\'s records '
                                         'and print the errors')
    cmp.add_argument('bench', help='thunder-bench --json file')
    cmp.add_argument('--trace', help='the benchmark\'s trace (default: '
                                     'the one its file names)')
    cmp.add_argument('--penalties-ms', type=float, nargs=2,
                     metavar=('HIT', 'MISS'),
                     help='per-read costs through a template, instead of '
                          'fitting them')
    cmp.add_argument('--p2p-seed-extra', type=float,
                     help='instead of fitting it on the smallest p2p-copy '
                          'storm of 2 hosts or more')
    cmp.add_argument('--shared-cpu-cores', type=int,
                     help='cores the benchmark\'s hosts shared, for records '
                          'that do not say (cpu_count)')
    cmp.add_argument('--max-hosts', type=int, default=16)
    cmp.add_argument('--limit', type=float, default=0.15)
    cmp.add_argument('--json')
    cmp.set_defaults(func=_compare)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except exception.ThunderException as e:
        print('Error: %s' % e, file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
