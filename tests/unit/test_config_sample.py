"""The committed sample configs match what oslo-config-generator makes."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@pytest.mark.parametrize('name', ['thunder-agent', 'nova-thunder'])
def test_sample_is_current(name, tmp_path):
    out = tmp_path / (name + '.conf.sample')
    generator = os.path.join(os.path.dirname(sys.executable),
                             'oslo-config-generator')
    subprocess.run([generator, '--config-file', os.path.join(
        ROOT, 'etc', 'oslo-config-generator', name + '.conf'),
        '--output-file', str(out)], check=True, cwd=ROOT)
    with open(os.path.join(ROOT, 'etc', name + '.conf.sample')) as f:
        committed = f.read()
    assert out.read_text() == committed, (
        'etc/%s.conf.sample is stale: run "tox -e genconfig"' % name)
