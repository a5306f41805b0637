"""What a compute node installs holds no lab code and has no import-time
side effects; nova-compute's import of the client registers no option."""

import ast
import configparser
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RUNTIME = ('thunder_agent', 'nova_thunder')
AGENT_GROUPS = {'agent', 'cache', 'qemu', 'relay', 'prefetch', 'coordinator',
                'kernel'}


def _modules(package):
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith('.py'):
                yield os.path.join(directory, name)


def _imports(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_runtime_packages_import_no_lab_or_test_code():
    for package in RUNTIME:
        for path in _modules(package):
            bad = [m for m in _imports(path)
                   if m.split('.')[0] in ('thunder_lab', 'tests')]
            assert not bad, '%s imports %s' % (path, bad)


def test_no_lab_subpackages_left_in_the_runtime():
    for name in ('bench', 'sim', 'testing'):
        assert not os.path.exists(os.path.join(ROOT, 'thunder_agent', name))
    assert not os.path.exists(os.path.join(ROOT, 'thunder_agent',
                                           'cmd', 'bench.py'))


def test_the_runtime_distribution_ships_only_the_runtime():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, 'setup.cfg'))
    packages = cfg['files']['packages'].split()
    assert sorted(packages) == sorted(RUNTIME)
    scripts = cfg['entry_points']['console_scripts']
    assert 'thunder_lab' not in scripts
    for name in ('thunder-bench', 'thunder-sim', 'thunder-trace',
                 'thunder-demo', 'thunder-build-test-image'):
        assert name + ' ' not in scripts


def _groups_after(code):
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(proc.stdout.split())


def test_importing_the_client_inside_nova_registers_no_agent_option():
    groups = _groups_after(
        'import nova.conf\n'
        'from oslo_config import cfg\n'
        'before = set(cfg.CONF)\n'
        'import nova_thunder.agent, thunder_agent.rpc.api\n'
        'import thunder_agent.exception, thunder_agent.rpc\n'
        'print(" ".join(sorted((set(cfg.CONF) - before) & %r)))\n'
        % AGENT_GROUPS)
    # (Libraries it imports, oslo.messaging, register their own groups.)
    assert groups == set(), groups


def test_importing_any_agent_module_registers_nothing():
    modules = sorted(
        os.path.relpath(p, ROOT)[:-3].replace(os.sep, '.')
        .replace('.__init__', '')
        for p in _modules('thunder_agent')
        if '/cmd/' not in p)
    groups = _groups_after(
        'from oslo_config import cfg\n'
        'import importlib\n'
        'for m in %r:\n'
        '    importlib.import_module(m)\n'
        'print(" ".join(sorted(set(cfg.CONF) & %r)))\n'
        % (modules, AGENT_GROUPS))
    assert groups == set(), groups
