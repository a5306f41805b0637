"""Create and delete servers with thunder block devices through Nova's API.

Runs nova_cases.py (Nova's in-process functional harness) in a process of
its own, against the real agent and RabbitMQ of this test, and a tgt iSCSI
target holding the golden volume.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.functional, pytest.mark.slow,
              pytest.mark.timeout(900)]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def test_servers_with_thunder_block_devices(rabbit, agent, image,
                                            iscsi_volume, workdir):
    target = iscsi_volume['target']
    env = dict(
        os.environ,
        # Nova 34's native threading mode, as nova-compute runs.
        OS_NOVA_DISABLE_EVENTLET_PATCHING='1',
        THUNDER_TRANSPORT_URL=rabbit.transport_url,
        THUNDER_AGENT_HOST=agent.host,
        THUNDER_IMAGE_PATH=image['path'],
        THUNDER_IMAGE_SIZE=str(image['size']),
        THUNDER_ISCSI=json.dumps({'portal': target.portal, 'iqn': target.iqn,
                                  'user': target.user,
                                  'password': target.password}),
    )
    cmd = [sys.executable, '-m', 'pytest', '--noconftest', '-p',
           'no:cacheprovider', '-q', '-rs', '-o', 'python_files=nova_cases.py',
           '-W', 'ignore', '--junitxml', os.path.join(workdir, 'nova.xml'),
           os.path.join(HERE, 'nova_cases.py')]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=840)
    output = proc.stdout + proc.stderr
    print(output[-6000:])
    assert proc.returncode == 0, output[-6000:]
    summary = re.search(r'(\d+) passed', output)
    assert summary and int(summary.group(1)) == 4, output[-2000:]
    assert 'skipped' not in output.splitlines()[-1], output[-2000:]
