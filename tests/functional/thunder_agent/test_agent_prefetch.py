"""Prefetching through the agent: trace prefetch on template creation,
full prefetch on request."""

import os
import time
import uuid

import pytest

from thunder_agent import exception
from thunder_agent import trace as trace_mod
from thunder_lab.emulation import reader

pytestmark = pytest.mark.functional
MIB = 1 << 20


def _wait_prefetch(agent, image_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = agent.client.get_status()['templates'][0]
        if t.get('prefetch', {}).get('state') in ('done', 'failed'):
            return t
        time.sleep(0.3)
    pytest.fail('prefetch of %s did not finish' % image_id)


def test_trace_prefetch_then_boot_reads_cost_the_origin_nothing(
        agent_factory, image, origin):
    # A boot trace: scattered reads over a fifth of the image.
    reads = [trace_mod.Read(t=i * 0.01, offset=off, length=256 * 1024)
             for i, off in enumerate(range(0, image['size'], 5 * MIB))]
    trace = trace_mod.Trace(image['size'], image['sha256'], reads)
    agent = agent_factory()
    traces = os.path.join(agent.state_path, 'traces')
    os.makedirs(traces, exist_ok=True)
    trace.save(os.path.join(traces, image['id'] + '.trace'))

    before = origin.bytes_read()
    conn = agent.client.prepare(image['id'], origin.connection(),
                                image['size'], 'raw', str(uuid.uuid4()))
    status = _wait_prefetch(agent, image['id'])
    prefetch = status['prefetch']
    assert prefetch['state'] == 'done', prefetch
    assert prefetch['bytes_done'] == prefetch['bytes_total'] == (
        len(reads) * 256 * 1024)
    assert status['cached_bytes'] == len(reads) * 256 * 1024
    fetched = origin.bytes_read() - before
    # The boot now replays its reads: all from the cache.
    middle = origin.bytes_read()
    with reader.open_snapshot(conn) as handle:
        for r in reads:
            with open(image['path'], 'rb') as f:
                f.seek(r.offset)
                assert handle.pread(r.length, r.offset) == f.read(r.length)
    assert origin.bytes_read() - middle == 0
    print('\ntrace prefetch: %d bytes fetched ahead, replay cost 0'
          % fetched)


def test_full_prefetch_on_request(agent, image, origin):
    agent.client.prepare_template(image['id'], origin.connection(),
                                  image['size'], 'raw')
    with pytest.raises(exception.InvalidInput):
        agent.client.prefetch(image['id'], 'trace')  # no trace for it
    with pytest.raises(exception.InvalidInput):
        agent.client.prefetch(image['id'], 'everything')
    with pytest.raises(exception.TemplateNotFound):
        agent.client.prefetch(str(uuid.uuid4()), 'full')
    started = agent.client.prefetch(image['id'], 'full', rate_mb=64)
    assert started['bytes_total'] == image['size']
    status = _wait_prefetch(agent, image['id'])
    assert status['prefetch']['state'] == 'done'
    assert status['cached_bytes'] == image['size']
    # At 64 MiB/s a 48 MiB image takes most of a second at least.
    assert status['prefetch']['jobs'][0]['elapsed_s'] >= 0.5
    conn = agent.client.create_snapshot(image['id'], str(uuid.uuid4()))
    before = origin.bytes_read()
    assert reader.checksum(conn) == (image['sha256'], image['size'])
    assert origin.bytes_read() - before == 0
