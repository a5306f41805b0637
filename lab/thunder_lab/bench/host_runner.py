"""The VMs of one emulated host, run inside the host's network namespace.

A template's exports and a snapshot's backing live on the host's cluster
address, so a VM has to run where the host's network is.
The benchmark starts one runner per host before the storm and feeds it
commands, one JSON object per line on stdin::

    {"cmd": "vm", "name": N, "connection_info": {...}}

and reads events, one JSON object per line on stdout::

    {"event": "ready"}
    {"event": "vm", "name": N, "ok": true, "boot_s": S, ...}

On end of input the runner waits for its VMs, then exits.
"""

import argparse
import dataclasses
import json
import sys
import threading

from thunder_lab.bench import vm as vm_mod
from thunder_agent import trace as trace_mod

_out_lock = threading.Lock()


def emit(**event):
    with _out_lock:
        sys.stdout.write(json.dumps(event) + '\n')
        sys.stdout.flush()


def _vm(args, trace, command):
    name = command['name']
    try:
        if args.vm == 'replay':
            result = vm_mod.run_replay(name, command['connection_info'],
                                       trace, args.expected)
        else:
            result = vm_mod.run_real(name, command['connection_info'],
                                     args.expected, timeout=args.timeout,
                                     workdir=args.workdir)
    except Exception as e:  # reported to the benchmark, which counts it
        result = vm_mod.VMResult(name, False, 0.0, error=repr(e))
    emit(event='vm', **dataclasses.asdict(result))


def main(argv=None):
    parser = argparse.ArgumentParser(prog='thunder_lab.bench.host_runner')
    parser.add_argument('--trace', required=True)
    parser.add_argument('--expected', required=True,
                        help='sha256 a correct VM reports')
    parser.add_argument('--vm', choices=('replay', 'real'),
                        default='replay')
    parser.add_argument('--timeout', type=float, default=900)
    parser.add_argument('--workdir')
    args = parser.parse_args(argv)
    trace = trace_mod.load(args.trace)
    threads = []
    emit(event='ready')
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get('cmd') != 'vm':
            emit(event='error', error='unknown command %r'
                 % command.get('cmd'))
            continue
        thread = threading.Thread(target=_vm, args=(args, trace, command))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


if __name__ == '__main__':
    sys.exit(main())
