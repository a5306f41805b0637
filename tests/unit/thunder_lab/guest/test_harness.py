"""The guest harness's script, argument handling and report parsing (no
QEMU run; tests/functional/test_guest_harness.py boots the guest)."""

import os
import subprocess
import sys

import pytest

from thunder_lab import exception as lab_exception
from thunder_lab.guest import harness as guest_harness


def test_guest_script_runs_pytest_and_collects_results(tmp_path):
    script = guest_harness.guest_script(
        str(tmp_path), ['tests/guest'], ['-k', 'relay'], test_timeout=600)
    root = guest_harness.project_root()
    assert script.startswith('#!/bin/bash\n')
    assert 'cd %s' % root in script
    assert 'THUNDER_GUEST=1' in script
    assert 'THUNDER_GUEST_RESULTS=%s' % tmp_path in script
    pytest_line = [line for line in script.splitlines()
                   if ' -m pytest ' in line][0]
    assert pytest_line.startswith(sys.executable)
    assert '--junitxml=%s/junit.xml' % tmp_path in pytest_line
    assert '--timeout=600' in pytest_line
    assert pytest_line.index('-k relay') < pytest_line.index('tests/guest')
    assert 'echo $? > %s/exit_code' % tmp_path in script
    assert 'dmesg > %s/dmesg.log' % tmp_path in script
    # Valid shell.
    subprocess.run(['bash', '-n'], input=script, text=True, check=True)


def test_cached_share_never_hides_the_results_directory(tmp_path):
    root = guest_harness.project_root()
    assert root in guest_harness._cached_trees(str(tmp_path))
    inside = os.path.join(root, 'guest-results')
    trees = guest_harness._cached_trees(inside)
    assert root not in trees
    for tree in trees:
        assert not (inside + os.sep).startswith(tree + os.sep)


def test_parse_junit(tmp_path):
    report = tmp_path / 'junit.xml'
    report.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites>'
        '<testsuite name="pytest" errors="1" failures="2" skipped="1" '
        'tests="9" time="1.0"></testsuite></testsuites>')
    assert guest_harness.parse_junit(str(report)) == {
        'tests': 9, 'failed': 2, 'errors': 1, 'skipped': 1, 'passed': 5}
    assert guest_harness.parse_junit(str(tmp_path / 'missing.xml')) is None
    report.write_text('<testsuites')
    assert guest_harness.parse_junit(str(report)) is None


def test_result_summary_and_verdict():
    result = guest_harness.GuestResult(
        returncode=0, timed_out=False, duration=12.3, results_dir='/r',
        tests=3, passed=3)
    assert result.ok
    assert result.summary() == ('guest run passed in 12 s: 3 tests, 3 '
                                'passed, 0 failed, 0 errors, 0 skipped '
                                '(results in /r)')
    assert not guest_harness.GuestResult(
        returncode=0, timed_out=True, duration=1, results_dir='/r').ok
    assert not guest_harness.GuestResult(
        returncode=1, timed_out=False, duration=1, results_dir='/r',
        failed=1).ok


def test_missing_prerequisites_fail_clearly(monkeypatch):
    monkeypatch.setattr(guest_harness, 'find_kernel', lambda: None)
    monkeypatch.setattr(guest_harness, '_search_path', lambda: '/nonexistent')
    with pytest.raises(lab_exception.GuestHarnessError) as info:
        guest_harness.ensure_prerequisites(install=False)
    message = str(info.value)
    assert 'linux-image-amd64' in message and 'apt-get install' in message


def test_cli_reports_missing_prerequisites(monkeypatch, capsys):
    monkeypatch.setattr(guest_harness, 'find_kernel', lambda: None)
    monkeypatch.setattr(guest_harness, '_search_path', lambda: '/nonexistent')
    assert guest_harness.main(['--no-install', '-k', 'relay']) == 2
    assert 'missing Debian packages' in capsys.readouterr().err
