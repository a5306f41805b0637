"""Create and delete servers with thunder block devices through Nova's API.

Runs nova_cases.py (Nova's in-process functional harness) in a process of
its own, against the real agent and RabbitMQ of this test, and a tgt iSCSI
target holding the golden volume.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.functional.nova_thunder import iscsi

pytestmark = [pytest.mark.functional, pytest.mark.slow,
              pytest.mark.timeout(900)]

# Nova's functional harness imports these test-only packages.
HARNESS_PACKAGES = {'oslotest': 'oslotest', 'wsgi_intercept': 'wsgi-intercept',
                    'placement': 'openstack-placement'}
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


@pytest.fixture
def golden_volume(workdir, image):
    """The golden volume's iSCSI target, or None (its case then skips)."""
    lun = os.path.join(workdir, 'golden.lun')
    with open(image['path'], 'rb') as src, open(lun, 'wb') as dst:
        dst.write(src.read())
        dst.truncate(1 << 30)
    target = iscsi.IscsiTarget(lun, 'iqn.2010-10.org.openstack:volume-golden')
    try:
        target.start()
    except iscsi.TargetUnavailable as e:
        print('golden volume case will skip: %s' % e)
        yield None
        return
    yield target
    target.stop()


def test_servers_with_thunder_block_devices(rabbit, agent, image,
                                            golden_volume):
    missing = [pip for module, pip in HARNESS_PACKAGES.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip("Nova's functional test harness needs the Python "
                    'packages %s' % ', '.join(missing))
    env = dict(
        os.environ,
        # Nova 34's native threading mode, as nova-compute runs.
        OS_NOVA_DISABLE_EVENTLET_PATCHING='1',
        THUNDER_TRANSPORT_URL=rabbit.transport_url,
        THUNDER_AGENT_HOST=agent.host,
        THUNDER_IMAGE_PATH=image['path'],
        THUNDER_IMAGE_SIZE=str(image['size']),
        # The agent's file_origin_dirs, and its layout for [thunder].
        THUNDER_IMAGE_STORE=agent.store,
        THUNDER_AGENT_STATE_PATH=agent.state_path,
        THUNDER_AGENT_RUN_PATH=agent.run_path,
    )
    if golden_volume is not None:
        env['THUNDER_ISCSI'] = json.dumps({
            'portal': golden_volume.portal, 'iqn': golden_volume.iqn,
            'user': golden_volume.user, 'password': golden_volume.password})
    # The standard runner: Nova's test cases clean their attributes up in
    # a way pytest's unittest support does not expect.
    cmd = [sys.executable, '-W', 'ignore', '-m', 'unittest', '-v',
           'tests.functional.nova_thunder.nova_cases']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=840)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert proc.returncode == 0, output[-8000:]
    ran = re.search(r'^Ran (\d+) tests? in ([\d.]+)s$', output, re.M)
    assert ran and int(ran.group(1)) == 5, output[-2000:]
    for line in lines:
        if line.startswith('tests.functional.nova_thunder.nova_cases.'):
            print(line)
    # Every case ran ("OK", not "OK (skipped=...)"), except the golden
    # volume's when no iSCSI target can run here.
    expected = 'OK' if golden_volume is not None else 'OK (skipped=1)'
    assert lines[-1] == expected, output[-2000:]
    print('Nova functional cases: %s tests in %ss' % ran.groups())
