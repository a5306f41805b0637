"""Boot the Debian kernel under QEMU and run tests/guest inside it.

This is how the kernel backend's tests run in CI: the host's kernel lacks
device-mapper, SCSI and iSCSI. The harness installs what is missing (as
root) or the test is skipped with the reason.
"""

import json
import os

import pytest

from thunder_lab import exception as lab_exception
from thunder_lab.guest import harness as guest_harness

pytestmark = [pytest.mark.functional, pytest.mark.guest, pytest.mark.slow]

# The guest suite takes 12 to 16 minutes on 2 cores, boot included
# (under TCG, each of the three agents' and the coordinator's start-up
# takes a minute and each prepare about 45 s); the rest leaves a
# loaded host some margin.
TIMEOUT = 1500


@pytest.mark.timeout(TIMEOUT + 300)
def test_kernel_backend_suite_passes_inside_the_guest(tmp_path):
    try:
        result = guest_harness.run(results_dir=str(tmp_path),
                                   timeout=TIMEOUT)
    except lab_exception.GuestHarnessError as e:
        pytest.skip(str(e))
    print(result.summary())
    log = tmp_path / 'pytest.log'
    if not result.ok and log.exists():
        print(log.read_text()[-20000:])
    assert not result.timed_out
    assert result.returncode == 0
    assert (result.failed, result.errors, result.skipped) == (0, 0, 0)
    assert result.passed == result.tests >= 8
    # It really ran under the Debian kernel, not the host's.
    release = (tmp_path / 'kernel-release').read_text().strip()
    assert release.endswith('-amd64') and release != os.uname().release

    measured = json.loads((tmp_path / 'measurements.json').read_text())
    print(json.dumps(measured, indent=1, sort_keys=True))
    # Three real agents and a coordinator over RPC: the chain
    # origin -> A -> B -> C read the image from the origin once.
    relay = measured['agent_relay_origin_bytes']
    assert relay['tree'] == {'agent-a': ['@origin'],
                             'agent-b': ['agent-a'],
                             'agent-c': ['agent-b']}
    assert relay['ratio_reads'] <= 1.10
    # A parent died mid-read: the reads waited, then went on from the
    # new parent, without an I/O error and with the right data.
    failover = measured['agent_failover']
    assert failover['io_error'] is False
    assert failover['checksum_ok'] is True
    assert failover['new_parent'] == '@origin'
    assert failover['ratio_reads'] <= 1.10
    choice = measured['cache_choice_origin_bytes']
    assert choice['bcache'] == min(v for k, v in choice.items()
                                   if k not in ('image_bytes', 'ratios'))
