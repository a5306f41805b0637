"""The tree passes the style checks tox's pep8 environment runs."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SHELL_SCRIPTS = ['tools/thunder-dev', 'tools/guest-run', '.ci/run',
                 'devstack/plugin.sh']


def test_flake8_is_clean():
    proc = subprocess.run(
        [sys.executable, '-m', 'flake8', 'nova_thunder', 'thunder_agent',
         'lab/thunder_lab', 'tests'], cwd=ROOT, capture_output=True, text=True)
    if 'No module named flake8' in proc.stderr:
        pytest.skip('flake8 is not installed (pip install flake8)')
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_scripts_pass_shellcheck():
    if shutil.which('shellcheck') is None:
        pytest.skip('shellcheck is not installed (apt-get install '
                    'shellcheck)')
    scripts = SHELL_SCRIPTS + sorted(
        os.path.join('tools', name) for name in os.listdir(
            os.path.join(ROOT, 'tools')) if name.endswith('.sh'))
    proc = subprocess.run(['shellcheck'] + scripts, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
