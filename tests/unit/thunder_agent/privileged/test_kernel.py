"""The block context's entry points: only the agent's files and devices,
tables and command lines built here from checked values.

Entry points run in this process (privsep client mode off); commands are
recorded, never run; devices exist in a fake sysfs tree.
"""

import os

import pytest

from thunder_agent import exception
from thunder_agent import privileged
from thunder_agent.privileged import kernel as priv
from thunder_agent.privileged import scope as sc

from tests.unit.thunder_agent.privileged.conftest import IMAGE
from tests.unit.thunder_agent.privileged.conftest import INSTANCE

OTHER = '9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d'
REFUSED = exception.PrivilegedOperationNotAllowed
ENTRY_POINTS = ('load_kernel_modules', 'attach_loop', 'detach_loop',
                'dm_info', 'dm_open_count', 'dm_status', 'remove_dm_device',
                'create_source_map', 'reload_source_map',
                'create_bcache_backing', 'create_dm_cache',
                'create_template_map', 'create_snapshot_map', 'make_bcache',
                'write_sysfs')


def test_entry_points_run_in_the_block_context():
    assert privileged.block.pypath == 'thunder_agent.privileged.block'
    for name in ENTRY_POINTS:
        assert privileged.block.is_entrypoint(getattr(priv, name)), name


# -- the generic entry points are gone ---------------------------------------

@pytest.mark.parametrize('name,argv', [
    ('dmsetup', ['remove', '--force', 'cinder--volumes-volume--1']),
    ('dmsetup', ['message', 'cinder-vg', '0', 'x']),
    ('tgtadm', ['--lld', 'iscsi', '--op', 'delete', '--mode', 'target',
                '--tid', '1']),
    ('losetup', ['-d', '/dev/loop0']),
    ('losetup', ['--find', '--show', '/etc/shadow']),
    ('make_bcache', ['-B', '/dev/sda']),
    ('blockdev_size', '/dev/sda'),
])
def test_no_entry_point_takes_a_command_line(in_process, commands, name,
                                             argv):
    # Gone, or (make_bcache) semantic: an argument vector is no call.
    func = getattr(priv, name, None)
    if func is not None:
        with pytest.raises((REFUSED, TypeError)):
            func(argv)
    assert commands.argv == []


# -- scopes -------------------------------------------------------------------

@pytest.mark.parametrize('change', [
    {'state_path': '/'}, {'state_path': '/var/lib'},
    {'state_path': 'relative/state'}, {'state_path': None},
    {'device_prefix': 'cinder'}, {'device_prefix': '-th'},
    {'device_prefix': 'th\n'}, {'iqn_prefix': 'iqn.2010-10.org.other'},
    {'extra': 1},
])
def test_scopes_outside_the_configuration_are_refused(scope, commands,
                                                      change):
    bad = dict(scope, **change)
    with pytest.raises(REFUSED):
        priv.dm_info(bad, 'tha-snap-' + INSTANCE)
    assert commands.argv == []


def test_a_scope_under_the_configured_root_is_admitted(scope, state):
    admitted = sc.admit(dict(scope, state_path=str(state / 'templates')))
    assert admitted.real_root == os.path.realpath(str(state / 'templates'))
    with pytest.raises(REFUSED):
        sc.admit(dict(scope, state_path=str(state) + '-other'))
    with pytest.raises(REFUSED):
        sc.admit(dict(scope, state_path=str(state / 'templates' / '..')))
    with pytest.raises(REFUSED):
        sc.admit('not a dict')


# -- loop devices -------------------------------------------------------------

@pytest.fixture
def configured_loops(monkeypatch):
    """LOOP_CONFIGURE in place: the files the helper would bind."""
    bound = []

    def configure(fd, real, read_only):
        bound.append((os.readlink('/proc/self/fd/%d' % fd), read_only))
        return 0, '/dev/loop%d' % (len(bound) - 1), ''

    monkeypatch.setattr(priv, '_configure_loop', configure)
    return bound


def test_attach_loop_binds_the_checked_file(scope, state, commands,
                                            configured_loops):
    cow = state / 'snapshots' / INSTANCE / 'cow.img'
    cow.write_bytes(b'')
    assert priv.attach_loop(scope, str(cow)) == (0, '/dev/loop0', '')
    assert priv.attach_loop(scope, str(cow), True) == (0, '/dev/loop1', '')
    assert configured_loops == [(str(cow), False), (str(cow), True)]
    # No command line at all.
    assert commands.argv == []


def test_attach_loop_refuses_what_is_not_the_agents(scope, state, tmp_path,
                                                    configured_loops):
    outside = tmp_path / 'secret'
    outside.write_bytes(b'root only')
    link = state / 'templates' / IMAGE / 'cache.img'
    os.symlink(str(outside), str(link))
    dir_link = state / 'templates' / 'linked'
    os.symlink(str(tmp_path), str(dir_link))
    (state / 'fifo').parent.mkdir(exist_ok=True)
    os.mkfifo(str(state / 'fifo'))
    for path in (str(outside), '/etc/shadow', str(link),
                 str(dir_link / 'secret'),
                 str(state / 'templates' / '..' / '..' / 'secret'),
                 str(state) + '/', str(state) + '//templates/x',
                 '-' + str(state), str(state / 'a\nb'), str(state / 'a\0b'),
                 str(state / 'fifo'), str(state / 'templates'), 7, None):
        with pytest.raises(REFUSED):
            priv.attach_loop(scope, path)
    with pytest.raises(REFUSED):
        priv.attach_loop(scope, str(state / 'x'), read_only='yes')
    assert configured_loops == []


def test_attach_loop_reports_a_missing_file(scope, state, configured_loops):
    code, out, err = priv.attach_loop(scope, str(state / 'missing.img'))
    assert code == 2 and out == '' and 'missing.img' in err


def test_detach_loop_only_for_loops_over_the_agents_files(scope, state,
                                                          tmp_path, sysfs,
                                                          commands):
    own = sysfs.loop(3, state / 'snapshots' / INSTANCE / 'cow.img')
    other = sysfs.loop(0, tmp_path / 'cinder' / 'volume.img')
    # A file whose name merely starts like the state directory.
    sysfs.loop(1, str(state) + '-other/x.img')
    assert priv.detach_loop(scope, own) == (0, '', '')
    for device in (other, '/dev/loop1', '/dev/loop7', '/dev/sda',
                   '/dev/loop3 /dev/loop0', '-d', '/dev/../dev/loop3'):
        with pytest.raises(REFUSED):
            priv.detach_loop(scope, device)
    assert commands.argv == [['losetup', '--detach', own]]


# -- device-mapper ------------------------------------------------------------

@pytest.mark.parametrize('name', [
    'cinder--volumes-volume--1', 'tha', 'tha-' + IMAGE,
    'tha-%s-src2' % IMAGE, 'tha-%s-tpl' % IMAGE.upper(),
    'thb-%s-tpl' % IMAGE, 'th-%s-tpl' % IMAGE, 'tha-snap-x',
    'tha-snap-%s\n' % INSTANCE, '--force', 'tha-%s-tpl --force' % IMAGE,
])
def test_dm_queries_and_removal_only_for_the_agents_names(scope, commands,
                                                          name):
    for func in (priv.dm_info, priv.dm_status, priv.dm_open_count,
                 priv.remove_dm_device):
        with pytest.raises(REFUSED):
            func(scope, name)
    assert commands.argv == []


def test_dm_queries_and_removal(scope, commands):
    name = 'tha-%s-tpl' % IMAGE
    priv.dm_info(scope, name)
    priv.dm_status(scope, 'tha-snap-' + INSTANCE)
    priv.dm_open_count(scope, name)
    priv.remove_dm_device(scope, name)
    assert commands.argv == [
        ['dmsetup', 'info', name],
        ['dmsetup', 'status', 'tha-snap-' + INSTANCE],
        ['dmsetup', 'info', '-c', '--noheadings', '-o', 'open', name],
        ['dmsetup', 'remove', '--retry', name]]


def test_source_map_over_iscsi_disks(scope, sysfs, commands):
    sda, sda_dev = sysfs.scsi('sda')
    sdb, sdb_dev = sysfs.scsi('sdb')
    assert priv.create_source_map(scope, IMAGE, 65536, [sda, sdb]) == \
        (0, '', '')
    name = 'tha-%s-src' % IMAGE
    assert commands.argv == [['dmsetup', 'create', name, '--uuid',
                              'THUNDER-' + name, '--readonly']]
    assert commands.stdin == [
        '0 65536 multipath 1 queue_if_no_path 0 1 1 round-robin 0 2 1 '
        '%s 1 %s 1\n' % (sda_dev, sdb_dev)]
    commands.argv.clear()
    commands.stdin.clear()
    priv.reload_source_map(scope, IMAGE, 65536, [sdb])
    assert commands.argv == [
        ['dmsetup', 'suspend', '--noflush', name],
        ['dmsetup', 'load', name, '--readonly'],
        ['dmsetup', 'resume', name]]
    assert commands.stdin[1].endswith(' 1 %s 1\n' % sdb_dev)


def test_a_failed_load_still_resumes(scope, sysfs, commands, monkeypatch):
    sda, _ = sysfs.scsi('sda')
    answers = iter([(0, '', ''), (1, '', 'load failed'), (0, '', '')])
    monkeypatch.setattr(priv, '_run', lambda argv, stdin=None:
                        (commands.argv.append(argv), next(answers))[1])
    assert priv.reload_source_map(scope, IMAGE, 8, [sda]) == \
        (1, '', 'load failed')
    assert [a[1] for a in commands.argv] == ['suspend', 'load', 'resume']


@pytest.mark.parametrize('disks', [
    [], '/dev/sda', ['/dev/sdz'], ['/dev/sdc'], ['/dev/loop0'],
    ['8:0'], ['/dev/sda', '/dev/sda'], ['/dev/sda\n0 1 linear /dev/x 0'],
    ['/dev/sda 1 /dev/sdb'],
])
def test_source_maps_take_only_iscsi_disks(scope, sysfs, commands, disks,
                                           state):
    sysfs.scsi('sda')
    sysfs.scsi('sdc', session=False)
    sysfs.loop(0, state / 'x.img')
    with pytest.raises((REFUSED, exception.InvalidDeviceTable)):
        priv.create_source_map(scope, IMAGE, 8, disks)
    with pytest.raises((REFUSED, exception.InvalidDeviceTable)):
        priv.reload_source_map(scope, IMAGE, 8, disks)
    assert commands.argv == []


@pytest.mark.parametrize('image_id,length', [
    ('img1', 8), (IMAGE.upper(), 8), ('../' + IMAGE, 8), (IMAGE, 0),
    (IMAGE, -8), (IMAGE, True), (IMAGE, '8'), (IMAGE, 2 ** 60),
])
def test_ids_and_lengths_are_checked(scope, sysfs, commands, image_id,
                                     length):
    sda, _ = sysfs.scsi('sda')
    with pytest.raises(REFUSED):
        priv.create_source_map(scope, image_id, length, [sda])
    assert commands.argv == []


def test_cache_template_and_snapshot_tables(scope, state, sysfs, commands):
    tdir = state / 'templates' / IMAGE
    sb = sysfs.loop(0, tdir / 'bcache-sb.img')
    cache = sysfs.loop(1, tdir / 'cache.img')
    meta = sysfs.loop(2, tdir / 'dmcache-meta.img')
    cow = sysfs.loop(3, state / 'snapshots' / INSTANCE / 'cow.img')
    sysfs.dm(0, 'tha-%s-src' % IMAGE)
    sysfs.dm(1, 'tha-%s-bk' % IMAGE)
    bcache = sysfs.bcache(0, 'dm-1')
    src = '/dev/mapper/tha-%s-src' % IMAGE
    tpl = '/dev/mapper/tha-%s-tpl' % IMAGE

    priv.create_bcache_backing(scope, IMAGE, sb, 65536)
    priv.create_dm_cache(scope, IMAGE, 65536, meta, cache, 128,
                         'writethrough')
    priv.create_template_map(scope, IMAGE, 65536, bcache)
    priv.create_template_map(scope, IMAGE, 65536,
                             '/dev/mapper/tha-%s-dmc' % IMAGE)
    priv.create_snapshot_map(scope, INSTANCE, IMAGE, 65536, cow, 8)
    assert [a[2] for a in commands.argv] == [
        'tha-%s-%s' % (IMAGE, r) for r in ('bk', 'dmc', 'tpl', 'tpl')] + [
        'tha-snap-' + INSTANCE]
    assert [a[-1] for a in commands.argv] == [
        'THUNDER-tha-%s-bk' % IMAGE, 'THUNDER-tha-%s-dmc' % IMAGE,
        '--readonly', '--readonly', 'THUNDER-tha-snap-' + INSTANCE]
    assert commands.stdin == [
        '0 16 linear %s 0\n16 65536 linear %s 0\n' % (sb, src),
        '0 65536 cache %s %s %s 128 1 writethrough smq 0\n'
        % (meta, cache, src),
        '0 65536 linear %s 0\n' % bcache,
        '0 65536 linear /dev/mapper/tha-%s-dmc 0\n' % IMAGE,
        '0 65536 snapshot %s %s P 8\n' % (tpl, cow)]


def test_tables_take_only_the_agents_devices(scope, state, tmp_path, sysfs,
                                             commands):
    tdir = state / 'templates' / IMAGE
    own = sysfs.loop(0, tdir / 'cache.img')
    foreign = sysfs.loop(1, tmp_path / 'elsewhere.img')
    sysfs.dm(0, 'tha-%s-bk' % OTHER)
    sysfs.dm(1, 'cinder--volumes-volume--1')
    other_bcache = sysfs.bcache(0, 'dm-0')
    foreign_bcache = sysfs.bcache(1, 'dm-1')
    calls = [
        lambda: priv.create_bcache_backing(scope, IMAGE, foreign, 8),
        lambda: priv.create_bcache_backing(scope, IMAGE, '/dev/sda', 8),
        lambda: priv.create_bcache_backing(scope, IMAGE, '/dev/loop9', 8),
        lambda: priv.create_dm_cache(scope, IMAGE, 8, own, foreign, 128,
                                     'writethrough'),
        lambda: priv.create_dm_cache(scope, IMAGE, 8, own, own, 128,
                                     'writeback'),
        lambda: priv.create_dm_cache(scope, IMAGE, 8, own, own, 3,
                                     'writethrough'),
        lambda: priv.create_template_map(scope, IMAGE, 8, other_bcache),
        lambda: priv.create_template_map(scope, IMAGE, 8, foreign_bcache),
        lambda: priv.create_template_map(scope, IMAGE, 8, '/dev/bcache7'),
        lambda: priv.create_template_map(scope, IMAGE, 8, own),
        lambda: priv.create_template_map(scope, IMAGE, 8, '/dev/sda'),
        lambda: priv.create_template_map(
            scope, IMAGE, 8, '/dev/mapper/tha-%s-dmc' % OTHER),
        lambda: priv.create_snapshot_map(scope, INSTANCE, IMAGE, 8, foreign,
                                         8),
        lambda: priv.create_snapshot_map(scope, INSTANCE, IMAGE, 8, own, 3),
        lambda: priv.create_snapshot_map(scope, 'x', IMAGE, 8, own, 8),
    ]
    for call in calls:
        with pytest.raises((REFUSED, exception.InvalidDeviceTable)):
            call()
    assert commands.argv == []


def test_make_bcache_only_on_the_agents_devices(scope, state, tmp_path,
                                                sysfs, commands):
    cache = sysfs.loop(1, state / 'templates' / IMAGE / 'cache.img')
    foreign = sysfs.loop(2, tmp_path / 'elsewhere.img')
    for args in ((IMAGE, cache, 65536),):
        # No -bk device yet: refused.
        with pytest.raises(REFUSED):
            priv.make_bcache(scope, *args)
    sysfs.dm(0, 'tha-%s-bk' % IMAGE)
    for args in ((IMAGE, foreign, 65536), (IMAGE, '/dev/sda', 65536),
                 (IMAGE, cache, 3 * 65536), (IMAGE, cache, 512),
                 (IMAGE, cache, '65536'), (OTHER, cache, 65536),
                 (IMAGE, cache, 65536 << 20)):
        with pytest.raises(REFUSED):
            priv.make_bcache(scope, *args)
    assert commands.argv == []
    priv.make_bcache(scope, IMAGE, cache, 65536)
    assert commands.argv == [[
        'make-bcache', '--bucket', '65536', '--block', '512', '-B',
        '/dev/mapper/tha-%s-bk' % IMAGE, '-C', cache]]


# -- sysfs --------------------------------------------------------------------

@pytest.fixture
def bcache_sysfs(sysfs, state, tmp_path):
    """A registered bcache: -bk as dm-4, its cache set on loop1."""
    root = sysfs.root
    sysfs.loop(1, state / 'templates' / IMAGE / 'cache.img')
    sysfs.loop(2, tmp_path / 'cinder.img')
    dm = sysfs.dm(4, 'tha-%s-bk' % IMAGE)
    sysfs.dm(5, 'cinder--volumes-volume--1')
    virtual = sysfs.virtual
    for kname in ('dm-4', 'dm-5', 'loop1', 'loop2'):
        os.makedirs(os.path.join(root, 'block', kname, 'bcache'))
        for attribute in ('stop', 'sequential_cutoff', 'cache_mode'):
            open(os.path.join(root, 'block', kname, 'bcache', attribute),
                 'w').close()
    for cset, loop in (('8d2c1e4f-0a1b-4c2d-9e3f-5a6b7c8d9e0f', 'loop1'),
                       ('1d2c1e4f-0a1b-4c2d-9e3f-5a6b7c8d9e0f', 'loop2')):
        path = os.path.join(root, 'fs', 'bcache', cset)
        os.makedirs(path)
        os.symlink(os.path.join(virtual, loop, 'bcache'),
                   os.path.join(path, 'cache0'))
        for attribute in ('stop', 'congested_read_threshold_us'):
            open(os.path.join(path, attribute), 'w').close()
    open(os.path.join(root, 'fs', 'bcache', 'register'), 'w').close()
    session = os.path.join(root, 'devices', 'platform', 'host3',
                           'session2', 'iscsi_session', 'session2')
    os.makedirs(session)
    open(os.path.join(session, 'recovery_tmo'), 'w').close()
    return dm


def _read(path):
    with open(path) as f:
        return f.read()


def test_write_sysfs_tunes_the_agents_bcache(scope, sysfs, bcache_sysfs):
    root = sysfs.root
    own_set = os.path.join(root, 'fs', 'bcache',
                           '8d2c1e4f-0a1b-4c2d-9e3f-5a6b7c8d9e0f')
    backing = os.path.join(root, 'block', 'dm-4', 'bcache')
    register = os.path.join(root, 'fs', 'bcache', 'register')
    session = os.path.join(root, 'devices', 'platform', 'host3',
                           'session2', 'iscsi_session', 'session2',
                           'recovery_tmo')
    for path, value, written in (
            (register, '/dev/loop1', '/dev/loop1'),
            (register, '/dev/mapper/tha-%s-bk' % IMAGE,
             '/dev/mapper/tha-%s-bk' % IMAGE),
            (os.path.join(backing, 'sequential_cutoff'), 0, '0'),
            (os.path.join(backing, 'cache_mode'), 'writearound',
             'writearound'),
            (os.path.join(backing, 'stop'), 1, '1'),
            (os.path.join(own_set, 'congested_read_threshold_us'), 0, '0'),
            (os.path.join(own_set, 'stop'), 1, '1'),
            (session, 5, '5')):
        assert priv.write_sysfs(scope, path, value) == (0, '', '')
        assert _read(path) == written


def test_write_sysfs_refuses_others_devices_and_values(scope, sysfs,
                                                       bcache_sysfs):
    root = sysfs.root
    fs = os.path.join(root, 'fs', 'bcache')
    other_set = os.path.join(fs, '1d2c1e4f-0a1b-4c2d-9e3f-5a6b7c8d9e0f')
    own_set = os.path.join(fs, '8d2c1e4f-0a1b-4c2d-9e3f-5a6b7c8d9e0f')
    session = os.path.join(root, 'devices', 'platform', 'host3',
                           'session2', 'iscsi_session', 'session2',
                           'recovery_tmo')
    for path, value in (
            (os.path.join(fs, 'register'), '/dev/loop2'),
            (os.path.join(fs, 'register'), '/dev/sda'),
            (os.path.join(fs, 'register'), '/dev/mapper/cinder--volumes'),
            (os.path.join(fs, 'register'), '/dev/loop1\n/dev/loop2'),
            (os.path.join(other_set, 'stop'), 1),
            (os.path.join(own_set, 'stop'), 'x'),
            (os.path.join(own_set, 'congested_read_threshold_us'), -1),
            (os.path.join(root, 'block', 'dm-5', 'bcache', 'stop'), 1),
            (os.path.join(root, 'block', 'dm-4', 'bcache', 'cache_mode'),
             'writearound\nwriteback'),
            (os.path.join(root, 'block', 'dm-4', 'bcache',
                          'sequential_cutoff'), '0'),
            (session, 0), (session, 10 ** 6),
            ('/sys/kernel/mm/ksm/run', 1), ('/etc/passwd', 'x'),
            (os.path.join(fs, '..', '..', 'kernel', 'x'), 1)):
        with pytest.raises(REFUSED):
            priv.write_sysfs(scope, path, value)
    assert _read(os.path.join(other_set, 'stop')) == ''


def test_tools_run_with_the_block_contexts_capabilities_only(scope,
                                                             commands):
    priv.dm_info(scope, 'tha-snap-' + INSTANCE)
    assert commands.bounding == ['-all,+dac_override,+sys_admin']


def test_kernel_modules(in_process, commands):
    priv.load_kernel_modules(['loop', 'dm_snapshot'])
    assert commands.argv == [['modprobe', '-a', 'loop', 'dm_snapshot']]
    for names in (['nbd'], ['-r', 'loop'], 'loop', [], [7]):
        with pytest.raises(REFUSED):
            priv.load_kernel_modules(names)
    assert len(commands.argv) == 1


def test_missing_binary_reports_instead_of_raising(scope, monkeypatch):
    monkeypatch.setenv('PATH', '/nonexistent')
    code, out, err = priv.dm_info(scope, 'tha-snap-' + INSTANCE)
    assert code == 127 and 'not found' in err
