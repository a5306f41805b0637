"""Benchmark output: the terminal table, the JSON file and the plot."""

import json
import os
import tempfile

from thunder_lab.bench import metrics

MIB = 1 << 20

COLUMNS = (
    ('mode', 'mode', '%-16s'),
    ('H', 'hosts', '%3d'),
    ('VMs', 'vms', '%4d'),
    ('storm s', 'storm_s', '%8.2f'),
    ('p50 s', 'p50_s', '%7.2f'),
    ('p99 s', 'p99_s', '%7.2f'),
    ('bound s', 'bound_s', '%7.2f'),
    ('x bound', None, '%7.2f'),
    ('origin MiB', 'origin_bytes', '%10.1f'),
    ('x WS', None, '%6.2f'),
    ('max link MiB', 'max_link_bytes', '%12.1f'),
    ('CPU %', 'cpu_busy', '%5.0f'),
    ('dp CPU s/GiB', 'cpu_s_per_gib', '%12.2f'),
    ('data', 'checksums_ok', '%4s'),
)


def _cell(record, key, fmt, header):
    if header == 'x bound':
        value = record['storm_s'] / record['bound_s'] \
            if record.get('bound_s') else None
    elif header == 'x WS':
        value = record['origin_bytes'] / record['working_set_bytes'] \
            if record.get('working_set_bytes') else None
    else:
        value = record.get(key)
    if value is None:
        return '-'
    if key in ('origin_bytes', 'max_link_bytes'):
        value = value / MIB
    if key == 'cpu_busy':
        value = 100.0 * value
    if key == 'checksums_ok':
        value = 'ok' if value else 'BAD'
    return fmt % value


def table(records):
    """The results as a text table, one row per (mode, hosts)."""
    widths = [max(len(h), len(fmt % (0 if 'd' in fmt or 'f' in fmt else '')))
              for h, _, fmt in COLUMNS]
    rows = []
    for r in sorted(records, key=lambda r: (r['hosts'], _mode_order(r))):
        rows.append([_cell(r, key, fmt, h) for h, key, fmt in COLUMNS])
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = ['  '.join(h.rjust(w) if i else h.ljust(w)
                       for i, ((h, _, _), w) in enumerate(zip(COLUMNS,
                                                              widths)))]
    lines.append('  '.join('-' * w for w in widths))
    for row in rows:
        lines.append('  '.join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    if records:
        r = records[0]
        lines.append('')
        lines.append('image %.1f MiB, boot working set %.1f MiB (%.1f %%), '
                     'links %s Mbit/s, %s VM(s) per host (%s)' % (
                         r['image_bytes'] / MIB,
                         r['working_set_bytes'] / MIB,
                         100.0 * r['working_set_bytes'] / r['image_bytes'],
                         r.get('bandwidth_mbit', '?'),
                         r.get('vms_per_host', '?'), r.get('vm', '?')))
    return '\n'.join(lines)


def _mode_order(record):
    try:
        return metrics.MODES.index(record['mode'])
    except ValueError:
        return len(metrics.MODES)


def write_json(records, path, meta=None):
    """One JSON document: {"records": [...], "meta": {...}}; each record
    holds at least :data:`metrics.REQUIRED_KEYS`."""
    document = {'records': records, 'meta': meta or {}}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.bench-')
    with os.fdopen(fd, 'w') as f:
        json.dump(document, f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)
    return path


def load_json(path):
    with open(path) as f:
        document = json.load(f)
    if isinstance(document, list):
        return document
    return document['records']


def plot(records, path, title=None):
    """Storm time and origin bytes against H, one line per mode, with the
    bound (T*, and O* = working set) drawn dashed."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot

    modes = [m for m in metrics.MODES if any(r['mode'] == m
                                             for r in records)]
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(12, 4.8))
    markers = dict(zip(metrics.MODES, 'osD^vx'))
    for mode in modes:
        series = sorted((r['hosts'], r['storm_s'], r['origin_bytes'])
                        for r in records if r['mode'] == mode)
        hosts = [s[0] for s in series]
        left.plot(hosts, [s[1] for s in series], marker=markers[mode],
                  label=mode)
        right.plot(hosts, [s[2] / MIB for s in series],
                   marker=markers[mode], label=mode)
    bound = {}
    for r in records:
        bound[r['hosts']] = r['bound_s']
    hosts = sorted(bound)
    left.plot(hosts, [bound[h] for h in hosts], 'k--', label='bound T*')
    working_set = records[0]['working_set_bytes'] / MIB if records else 0
    right.axhline(working_set, color='k', linestyle='--',
                  label='bound O* (working set)')
    left.set_xlabel('hosts H')
    left.set_ylabel('storm time (s)')
    left.set_yscale('log')
    left.set_title('Storm time: start to last VM booted')
    right.set_xlabel('hosts H')
    right.set_ylabel('bytes sent by the origin (MiB)')
    right.set_yscale('log')
    right.set_title('Origin bytes')
    for axis in (left, right):
        axis.set_xscale('log', base=2)
        axis.set_xticks(hosts)
        axis.set_xticklabels([str(h) for h in hosts])
        axis.grid(True, which='both', alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path
