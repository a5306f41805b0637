"""A small bootable test disk image built from Debian packages.

The image boots entirely from its own disk, like a real VM image: BIOS ->
syslinux MBR -> syslinux on a FAT ``/boot`` partition -> Debian's cloud
kernel and a busybox initramfs -> ext4 root partition. The guest reads a
realistic mix of files (kernel modules, ``/etc``, busybox applets, a data
file of a few MiB), increments a boot counter on the disk and prints::

    THUNDER-BOOT-OK count=<n> data=<sha256 of the data file>

on ttyS0, then powers off so QEMU exits.

Layout (MBR partition table)::

    sector 0      syslinux mbr.bin + partition table
    partition 1   FAT /boot (active): ldlinux.sys, syslinux.cfg, vmlinuz,
                  initrd.img
    partition 2   ext4 root: busybox, modules, /etc, data file, counter

Packages are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``; nothing is installed on the host. The filesystems are made
without mounting anything (``mke2fs -d``, mtools), with fixed ids and
timestamps, so the image bytes depend only on the package set, this module
and the versions of the host tools. Both are part of a cache key: a build is
skipped when an image with the same key and intact bytes exists.

The cache lives in ``$THUNDER_CACHE_DIR/test-image`` (default
``<repo>/.cache/test-image``).
"""

import hashlib
import json
import math
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time

from oslo_concurrency import lockutils

from thunder_agent import exception
from thunder_lab import exception as lab_exception

KERNEL_METAPACKAGE = 'linux-image-cloud-amd64'
# Packages whose bytes end up in the image, besides the kernel.
PACKAGES = ('busybox-static', 'syslinux', 'syslinux-common')

MARKER = 'THUNDER-BOOT-OK'
FAIL_MARKER = 'THUNDER-BOOT-FAIL'
DATA_PATH = '/var/lib/thunder/data.bin'
COUNTER_PATH = '/var/lib/thunder/boot-count'
DATA_SIZE = 4 << 20
FILLER_DIR = '/usr/share/thunder/filler'

# Fixed identities and times: the image must not depend on the build date.
SOURCE_DATE_EPOCH = 1700000000
DISK_ID = '0x54485544'
BOOT_VOLUME_ID = '54485542'
ROOT_UUID = '5448554e-4445-5200-8000-000000000001'
ROOT_HASH_SEED = '5448554e-4445-5200-8000-000000000002'

MIB = 1 << 20
# Fixed, so that the journal does not grow in steps with the filler size.
JOURNAL_MIB = 4
SECTOR = 512
FIRST_PARTITION_SECTOR = 2048

# Loaded by the initramfs to reach the root disk (ext4 is built in).
INITRAMFS_MODULES = ('virtio_pci', 'virtio_blk')
# Loaded from the root filesystem by the guest's init, as a distro would.
ROOT_MODULES = ('virtio_net', 'virtio_rng', 'virtio_balloon',
                'virtio_console', 'fuse', 'overlay', 'squashfs', 'isofs',
                'vfat')

KERNEL_CMDLINE = 'root=/dev/vda2 console=ttyS0,115200 panic=-1 quiet'

# Host programs the build runs, with the Debian package providing each.
HOST_TOOLS = {
    'apt-get': 'apt',
    'apt-cache': 'apt',
    'dpkg-deb': 'dpkg',
    'depmod': 'kmod',
    'modprobe': 'kmod',
    'cpio': 'cpio',
    'gzip': 'gzip',
    'mke2fs': 'e2fsprogs',
    'debugfs': 'e2fsprogs',
    'mkfs.fat': 'dosfstools',
    'mcopy': 'mtools',
    'sfdisk': 'fdisk',
}
# How to ask each layout-relevant tool for its version (part of the key).
_TOOL_VERSION_ARGS = {
    'mke2fs': ['-V'],
    'mkfs.fat': ['--help'],
    'mcopy': ['--version'],
    'sfdisk': ['--version'],
    'cpio': ['--version'],
    'gzip': ['--version'],
    'depmod': ['--version'],
}

INITRAMFS_INIT = r'''#!/bin/busybox sh
# First stage: load the virtio disk driver, mount the root partition
# read-write and hand over to its /sbin/init.
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
    echo "%(fail)s stage=initramfs reason=$*" > /dev/ttyS0
    poweroff -f
}
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
root=/dev/vda2
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in root=*) root="${arg#root=}" ;; esac
done
for module in %(modules)s; do
    modprobe "$module" || fail "modprobe $module"
done
tries=0
while [ ! -b "$root" ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 200 ] && fail "no root device $root"
    sleep 0.05
done
mount -t ext4 -o rw "$root" /newroot || fail "mount $root"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
''' % {'fail': FAIL_MARKER, 'modules': ' '.join(INITRAMFS_MODULES)}

ROOT_INIT = r'''#!/bin/sh
# Second stage: a small distro boot. Reads modules, configuration and a
# data file from the disk, counts boots on the disk, reports on ttyS0.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
fail() {
    echo "%(fail)s stage=root reason=$*" > /dev/ttyS0
    sync
    poweroff -f
}
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t tmpfs -o mode=0755 tmpfs /run || fail "mount /run"
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount /tmp"
# Keep kernel messages from splitting the result line.
echo 1 > /proc/sys/kernel/printk
hostname -F /etc/hostname || fail "hostname"
while read -r module; do
    case "$module" in ''|'#'*) continue ;; esac
    modprobe "$module" || fail "modprobe $module"
done < /etc/modules
grep -q '^root:x:0:0:' /etc/passwd || fail "no root in /etc/passwd"
cat /etc/group /etc/hosts /etc/fstab /etc/os-release /etc/profile \
    /etc/services /etc/protocols > /run/etc.txt || fail "read /etc"
ls -lR /etc /lib/modules /bin > /run/ls.txt || fail "list files"
find /lib/modules -name '*.ko' | wc -l > /run/modules.count
uname -a > /run/uname.txt
lsmod > /run/lsmod.txt
grep -q '^squashfs ' /run/lsmod.txt || fail "modules not loaded"
data=$(sha256sum %(data)s) || fail "read %(data)s"
data=${data%%%% *}
count=$(cat %(counter)s 2>/dev/null || echo 0)
count=$((count + 1))
if ! { echo "$count" > %(counter)s.new && sync &&
        mv %(counter)s.new %(counter)s && sync; }; then
    fail "write boot counter"
fi
mount -o remount,ro / 2>/dev/null
echo "%(marker)s count=$count data=$data" > /dev/ttyS0
poweroff -f
''' % {'fail': FAIL_MARKER, 'marker': MARKER, 'data': DATA_PATH,
       'counter': COUNTER_PATH}

SYSLINUX_CFG = '''SERIAL 0 115200
DEFAULT thunder
PROMPT 0
TIMEOUT 0
LABEL thunder
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND %s
''' % KERNEL_CMDLINE

# Our own mke2fs.conf: the host's /etc/mke2fs.conf must not change the
# image. Same features as Debian 12's defaults for ext4.
MKE2FS_CONF = '''[defaults]
\tbase_features = %s
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = %s
\t}
''' % (','.join(['sparse_super', 'large_file', 'filetype',
                 'resize_inode', 'dir_index', 'ext_attr']),
       ','.join(['has_journal', 'extent', 'huge_file', 'flex_bg',
                 'metadata_csum', '64bit', 'dir_nlink', 'extra_isize']))

ETC_FILES = {
    'hostname': 'thunder-guest\n',
    'hosts': '127.0.0.1\tlocalhost\n127.0.1.1\tthunder-guest\n'
             '::1\tlocalhost ip6-localhost ip6-loopback\n',
    'passwd': 'root:x:0:0:root:/root:/bin/sh\n'
              'daemon:x:1:1:daemon:/usr/sbin:/bin/false\n'
              'nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n',
    'group': 'root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n',
    'shadow': 'root:*:19000:0:99999:7:::\n',
    'fstab': '/dev/vda2\t/\text4\tdefaults\t0\t1\n'
             '/dev/vda1\t/boot\tvfat\tdefaults,noauto\t0\t2\n',
    'os-release': 'PRETTY_NAME="nova-thunder test guest"\n'
                  'NAME="nova-thunder test guest"\nID=thunder-test\n',
    'profile': 'export PATH=/sbin:/bin:/usr/sbin:/usr/bin\n',
    'modules': '# Modules loaded at boot.\n%s\n' % '\n'.join(ROOT_MODULES),
    'protocols': ''.join('%s\t%d\t%s\n' % (name, number, name.upper())
                         for number, name in enumerate(
                             ['ip', 'icmp', 'igmp', 'ggp', 'ipencap', 'st',
                              'tcp', 'cbt', 'egp', 'igp'])),
    'services': ''.join('svc%d\t%d/tcp\n' % (port, port)
                        for port in range(1, 2000)),
}


def _default_progress(message):
    print(message, flush=True)


def repo_root():
    """The source tree this module belongs to, if it runs from one."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    return root if os.path.exists(os.path.join(root, 'setup.cfg')) else None


def cache_dir():
    """Directory holding downloaded packages and built images."""
    base = os.environ.get('THUNDER_CACHE_DIR')
    if not base:
        root = repo_root()
        base = (os.path.join(root, '.cache') if root else
                os.path.join(os.path.expanduser('~'), '.cache',
                             'nova-thunder'))
    return os.path.join(base, 'test-image')


def default_image_path(filler_mib=0):
    name = 'guest.raw' if not filler_mib else 'guest-filler%d.raw' % filler_mib
    return os.path.join(cache_dir(), name)


def manifest_path(image):
    return image + '.json'


def load_manifest(image):
    """The manifest written next to a built image, or None."""
    try:
        with open(manifest_path(image)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def data_bytes():
    """The data file's content: pseudo-random, the same on every build."""
    return hashlib.shake_256(b'nova-thunder guest data').digest(DATA_SIZE)


def expected_data_sha(image=None):
    """The sha256 the guest prints as ``data=``.

    Read from the image's manifest when there is one; otherwise computed
    from the generator (every build stores the same data file).
    """
    if image is not None:
        manifest = load_manifest(image)
        if manifest and 'data_sha256' in manifest:
            return manifest['data_sha256']
    return hashlib.sha256(data_bytes()).hexdigest()


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(MIB), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _check_tools():
    for program, package in sorted(HOST_TOOLS.items()):
        if not shutil.which(program, path=_tool_path()):
            raise lab_exception.ToolNotFound(program=program, package=package)


def _tool_path():
    # depmod, mke2fs and friends live in sbin, which a user's PATH may lack.
    path = os.environ.get('PATH', os.defpath).split(os.pathsep)
    for extra in ('/usr/local/sbin', '/usr/sbin', '/sbin'):
        if extra not in path:
            path.append(extra)
    return os.pathsep.join(path)


def _env(**extra):
    env = dict(os.environ, PATH=_tool_path(), LC_ALL='C',
               SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH),
               E2FSPROGS_FAKE_TIME=str(SOURCE_DATE_EPOCH),
               MTOOLS_SKIP_CHECK='1', MTOOLSRC='/dev/null')
    env.update(extra)
    return env


def _run(cmd, what, env=None, **kwargs):
    try:
        proc = subprocess.run(cmd, env=env or _env(), capture_output=True,
                              **kwargs)
    except OSError as e:
        raise lab_exception.GuestImageBuildFailed(
            reason='%s: cannot run %s: %s' % (what, cmd[0], e))
    if proc.returncode != 0:
        err = proc.stderr
        if isinstance(err, bytes):
            err = err.decode(errors='replace')
        raise lab_exception.GuestImageBuildFailed(
            reason='%s: %s exited with %d: %s' % (
                what, ' '.join(cmd), proc.returncode, err.strip()[-2000:]))
    return proc


def _tool_versions():
    versions = {}
    for program, args in sorted(_TOOL_VERSION_ARGS.items()):
        proc = subprocess.run([program] + args, env=_env(),
                              capture_output=True, text=True)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        versions[program] = lines[0] if lines else ''
    return versions


def _apt_show(packages):
    """Candidate stanza fields of each package, from apt's lists."""
    try:
        proc = _run(['apt-cache', 'show', '--no-all-versions'] +
                    list(packages), 'resolving packages', text=True)
    except lab_exception.GuestImageBuildFailed as e:
        raise lab_exception.PackageFetchFailed(
            package=' '.join(packages), reason=e.kwargs['reason'])
    stanzas = {}
    for block in proc.stdout.split('\n\n'):
        fields = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ':' in line:
                key, value = line.split(':', 1)
                fields.setdefault(key, value.strip())
        if 'Package' in fields and 'Version' in fields:
            stanzas.setdefault(fields['Package'], fields)
    missing = [p for p in packages if p not in stanzas]
    if missing:
        raise lab_exception.PackageFetchFailed(
            package=', '.join(missing),
            reason='no candidate version; run apt-get update')
    return stanzas


def resolve_packages():
    """Candidate versions of the packages the image is made of.

    The kernel metapackage is resolved to the versioned kernel package it
    depends on, e.g. linux-image-6.1.0-56-cloud-amd64.
    """
    stanzas = _apt_show((KERNEL_METAPACKAGE,) + PACKAGES)
    depends = stanzas[KERNEL_METAPACKAGE].get('Depends', '')
    match = re.search(r'(linux-image-[0-9][^\s,(]*)', depends)
    if not match:
        raise lab_exception.GuestImageBuildFailed(
            reason='%s depends on no versioned kernel: %r' % (
                KERNEL_METAPACKAGE, depends))
    kernel = match.group(1)
    packages = {kernel: _apt_show((kernel,))[kernel]['Version']}
    packages.update((name, stanzas[name]['Version']) for name in PACKAGES)
    return packages


def fetch_packages(packages, debs_dir, progress=_default_progress):
    """Download each package=version once; return name -> .deb path."""
    debs = {}
    for name, version in sorted(packages.items()):
        target = os.path.join(debs_dir, name,
                              re.sub(r'[^A-Za-z0-9.+~-]', '_', version))
        found = ([f for f in os.listdir(target) if f.endswith('.deb')]
                 if os.path.isdir(target) else [])
        if not found:
            progress('  downloading %s=%s' % (name, version))
            partial = target + '.partial'
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            cmd = ['apt-get', 'download', '-q']
            if os.geteuid() == 0:
                # The _apt sandbox user cannot write to the cache directory.
                cmd += ['-o', 'APT::Sandbox::User=root']
            try:
                _run(cmd + ['%s=%s' % (name, version)],
                     'downloading %s' % name, cwd=partial)
            except lab_exception.GuestImageBuildFailed as e:
                raise lab_exception.PackageFetchFailed(
                    package='%s=%s' % (name, version),
                    reason=e.kwargs['reason'])
            os.rename(partial, target)
            found = [f for f in os.listdir(target) if f.endswith('.deb')]
        debs[name] = os.path.join(target, found[0])
    return debs


def _cache_key(packages, filler_mib):
    with open(os.path.abspath(__file__), 'rb') as f:
        builder = hashlib.sha256(f.read()).hexdigest()
    inputs = {'builder': builder, 'packages': packages,
              'filler_mib': filler_mib, 'tools': _tool_versions()}
    return hashlib.sha256(
        json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _is_current(image, key):
    manifest = load_manifest(image)
    if not manifest or (key is not None and manifest.get('key') != key):
        return None
    try:
        if os.path.getsize(image) != manifest['size']:
            return None
    except OSError:
        return None
    # A raw image booted directly is modified by the guest: catch that.
    if sha256_file(image) != manifest['image_sha256']:
        return None
    return manifest


def build(output=None, force=False, filler_mib=0,
          progress=_default_progress):
    """Build the test image (or reuse a cached one); return its manifest.

    :param output: image path; default :func:`default_image_path`.
    :param force: rebuild even if an up-to-date image exists.
    :param filler_mib: MiB of extra pseudo-random files the boot never
        reads, to give the image a realistic working-set fraction.
    :returns: dict with at least ``path``, ``size``, ``image_sha256``,
        ``data_sha256``, ``packages``, ``kernel_version``, ``partitions``
        and ``built`` (False when the cached image was reused).
    """
    if isinstance(filler_mib, bool) or not isinstance(filler_mib, int) or \
            not 0 <= filler_mib <= 64 * 1024:
        raise exception.InvalidInput(
            reason='filler_mib must be an integer in [0, 65536], got %r'
                   % (filler_mib,))
    output = os.path.abspath(output or default_image_path(filler_mib))
    if os.path.isdir(output):
        raise exception.InvalidInput(reason='%s is a directory' % output)
    _check_tools()
    cache = cache_dir()
    os.makedirs(cache, exist_ok=True)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    started = time.monotonic()
    with lockutils.lock('image-build.lock', external=True, lock_path=cache):
        for name in os.listdir(cache):
            # Scratch space of an interrupted build.
            if name.startswith('scratch-'):
                shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
        progress('Resolving packages with apt')
        try:
            packages = resolve_packages()
        except lab_exception.PackageFetchFailed as e:
            # Offline with a usable image: keep using it.
            manifest = None if force else _is_current(output, None)
            if manifest:
                progress('  %s; reusing %s' % (e, output))
                return dict(manifest, path=output, built=False)
            raise
        key = _cache_key(packages, filler_mib)
        if not force:
            manifest = _is_current(output, key)
            if manifest:
                progress('Up to date: %s' % output)
                return dict(manifest, path=output, built=False)
        progress('Fetching packages into %s' % os.path.join(cache, 'debs'))
        debs = fetch_packages(packages, os.path.join(cache, 'debs'),
                              progress)
        workdir = tempfile.mkdtemp(prefix='scratch-', dir=cache)
        try:
            manifest = _ImageBuilder(workdir, debs, filler_mib,
                                     progress).build(output)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        manifest.update(key=key, packages=packages, filler_mib=filler_mib)
        tmp_manifest = manifest_path(output) + '.tmp'
        with open(tmp_manifest, 'w') as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write('\n')
        os.replace(tmp_manifest, manifest_path(output))
        progress('Built %s (%d MiB) in %.1f s' % (
            output, manifest['size'] // MIB, time.monotonic() - started))
        return dict(manifest, path=output, built=True)


class _ImageBuilder:
    """One build in a scratch directory; the result replaces ``output``."""

    def __init__(self, workdir, debs, filler_mib, progress):
        self.workdir = workdir
        self.debs = debs
        self.filler_mib = filler_mib
        self.progress = progress

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def build(self, output):
        self.progress('Unpacking packages')
        self.pkgs = {}
        os.makedirs(self.path('pkgs'))
        for name, deb in sorted(self.debs.items()):
            self.pkgs[name] = self.path('pkgs', name)
            _run(['dpkg-deb', '-x', deb, self.pkgs[name]],
                 'unpacking %s' % name)
        kernel_pkg = next(n for n in self.debs
                          if n.startswith('linux-image-'))
        self.kernel_root = self.pkgs[kernel_pkg]
        self.kver = self._kernel_version()
        _run(['depmod', '-b', self.kernel_root, self.kver],
             'indexing kernel modules')

        self.progress('Making initramfs (kernel %s)' % self.kver)
        initrd = self._make_initramfs()
        self.progress('Making root filesystem')
        root_img, root_size = self._make_root_fs()
        self.progress('Making boot filesystem')
        boot_img, boot_size = self._make_boot_fs(initrd)
        self.progress('Assembling disk')
        partitions = self._assemble(output + '.tmp', boot_img, boot_size,
                                    root_img, root_size)
        os.replace(output + '.tmp', output)
        return {
            'size': os.path.getsize(output),
            'image_sha256': sha256_file(output),
            'data_sha256': hashlib.sha256(data_bytes()).hexdigest(),
            'kernel_version': self.kver,
            'kernel_cmdline': KERNEL_CMDLINE,
            'marker': MARKER,
            'data_path': DATA_PATH,
            'counter_path': COUNTER_PATH,
            'partitions': partitions,
        }

    def _kernel_version(self):
        names = os.listdir(os.path.join(self.kernel_root, 'lib', 'modules'))
        if len(names) != 1:
            raise lab_exception.GuestImageBuildFailed(
                reason='expected one kernel in the kernel package, found %s'
                       % names)
        return names[0]

    def _module_closure(self, modules):
        """Module files (relative to /lib/modules/KVER) in load order."""
        files = []
        for module in modules:
            proc = _run(['modprobe', '-d', self.kernel_root, '-S', self.kver,
                         '--show-depends', module],
                        'resolving module %s' % module, text=True)
            for line in proc.stdout.splitlines():
                words = line.split()
                if len(words) >= 2 and words[0] == 'insmod':
                    rel = words[1].split('/lib/modules/%s/' % self.kver, 1)[1]
                    if rel not in files:
                        files.append(rel)
        return files

    def _install_modules(self, staging, modules):
        src = os.path.join(self.kernel_root, 'lib', 'modules', self.kver)
        dst = os.path.join(staging, 'lib', 'modules', self.kver)
        for rel in self._module_closure(modules):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)),
                        exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(dst, rel))
            os.chmod(os.path.join(dst, rel), 0o644)
        for name in ('modules.order', 'modules.builtin',
                     'modules.builtin.modinfo'):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            os.chmod(os.path.join(dst, name), 0o644)
        _run(['depmod', '-b', staging, self.kver], 'indexing modules')

    def _busybox(self):
        return os.path.join(self.pkgs['busybox-static'], 'bin', 'busybox')

    def _make_initramfs(self):
        staging = self.path('initramfs')
        for d in ('bin', 'dev', 'proc', 'sys', 'newroot'):
            os.makedirs(os.path.join(staging, d))
        shutil.copyfile(self._busybox(),
                        os.path.join(staging, 'bin', 'busybox'))
        os.chmod(os.path.join(staging, 'bin', 'busybox'), 0o755)
        _write(os.path.join(staging, 'init'), INITRAMFS_INIT, 0o755)
        self._install_modules(staging, INITRAMFS_MODULES)
        _normalize_tree(staging)
        names = sorted(_tree_paths(staging))
        listing = ''.join(n + '\0' for n in names)
        cpio = _run(['cpio', '--quiet', '--null', '-o', '-H', 'newc',
                     '--reproducible', '-R', '0:0'],
                    'archiving initramfs', cwd=staging,
                    input=listing.encode())
        initrd = self.path('initrd.img')
        gz = _run(['gzip', '-n', '-9', '-c'], 'compressing initramfs',
                  input=cpio.stdout)
        with open(initrd, 'wb') as f:
            f.write(gz.stdout)
        return initrd

    def _make_root_fs(self):
        staging = self.path('rootfs')
        for d in ('bin', 'sbin', 'usr/bin', 'usr/sbin', 'dev', 'proc', 'sys',
                  'run', 'tmp', 'root', 'boot', 'mnt', 'var/lib/thunder',
                  'var/log', 'etc'):
            os.makedirs(os.path.join(staging, d))
        busybox = os.path.join(staging, 'bin', 'busybox')
        shutil.copyfile(self._busybox(), busybox)
        os.chmod(busybox, 0o755)
        applets = _run([self._busybox(), '--list-full'],
                       'listing busybox applets', text=True).stdout.split()
        for applet in applets:
            link = os.path.join(staging, applet)
            if applet == 'sbin/init' or os.path.lexists(link):
                continue
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink('/bin/busybox', link)
        _write(os.path.join(staging, 'sbin', 'init'), ROOT_INIT, 0o755)
        for name, text in ETC_FILES.items():
            _write(os.path.join(staging, 'etc', name), text, 0o644)
        self._install_modules(staging, INITRAMFS_MODULES + ROOT_MODULES)
        with open(os.path.join(staging, DATA_PATH.lstrip('/')), 'wb') as f:
            f.write(data_bytes())
        if self.filler_mib:
            filler = os.path.join(staging, FILLER_DIR.lstrip('/'))
            os.makedirs(filler)
            for i in range(self.filler_mib):
                with open(os.path.join(filler, '%05d.bin' % i), 'wb') as f:
                    f.write(hashlib.shake_256(
                        b'nova-thunder filler %d' % i).digest(MIB))
        _normalize_tree(staging)
        os.chmod(os.path.join(staging, 'tmp'), 0o1777)
        os.chmod(os.path.join(staging, 'root'), 0o700)
        os.chmod(os.path.join(staging, 'etc', 'shadow'), 0o640)

        content = _tree_bytes(staging)
        # Room for inode tables (~2%), the journal and the counter's updates.
        size = _round_up(int(content * 1.05) + JOURNAL_MIB * MIB + 8 * MIB,
                         MIB)
        image = self.path('root.img')
        with open(image, 'wb') as f:
            f.truncate(size)
        conf = self.path('mke2fs.conf')
        _write(conf, MKE2FS_CONF, 0o644)
        _run(['mke2fs', '-q', '-F', '-t', 'ext4', '-T', 'default', '-m', '0',
              '-J', 'size=%d' % JOURNAL_MIB,
              '-L', 'thunder-root', '-U', ROOT_UUID,
              '-E', 'hash_seed=%s,root_owner=0:0' % ROOT_HASH_SEED,
              '-d', staging, image],
             'making ext4', env=_env(MKE2FS_CONFIG=conf))
        # mke2fs -d copies ctime, atime and owners from the staging files,
        # which depend on when and by whom they were made and read: pin them.
        script = []
        epoch = '@%d' % SOURCE_DATE_EPOCH
        for rel in ['/'] + ['/' + p for p in sorted(_tree_paths(staging))]:
            for field, value in (('ctime', epoch), ('atime', epoch),
                                 ('uid', '0'), ('gid', '0')):
                script.append('sif "%s" %s %s\n' % (rel, field, value))
        script_path = self.path('debugfs.cmds')
        _write(script_path, ''.join(script), 0o644)
        proc = _run(['debugfs', '-w', '-f', script_path, image],
                    'pinning inode times', text=True)
        if 'error' in proc.stderr.lower() or 'not found' in proc.stderr:
            raise lab_exception.GuestImageBuildFailed(
                reason='debugfs: %s' % proc.stderr.strip()[-2000:])
        return image, size

    def _make_boot_fs(self, initrd):
        staging = self.path('boot')
        os.makedirs(staging)
        kernel = os.path.join(self.kernel_root, 'boot',
                              'vmlinuz-%s' % self.kver)
        files = {'vmlinuz': kernel, 'initrd.img': initrd}
        cfg = os.path.join(staging, 'syslinux.cfg')
        _write(cfg, SYSLINUX_CFG, 0o644)
        files['syslinux.cfg'] = cfg
        content = sum(os.path.getsize(p) for p in files.values())
        # FAT overhead plus ldlinux.sys/.c32 (~180 KiB).
        size = _round_up(int(content * 1.05) + 2 * MIB, MIB)
        image = self.path('boot.img')
        with open(image, 'wb') as f:
            f.truncate(size)
        _run(['mkfs.fat', '--invariant', '-i', BOOT_VOLUME_ID,
              '-n', 'THUNDERBOOT', '-h', str(FIRST_PARTITION_SECTOR), image],
             'making FAT')
        for name, src in sorted(files.items()):
            staged = os.path.join(staging, name)
            if src != staged:
                shutil.copyfile(src, staged)
        _normalize_tree(staging)
        for name in sorted(files):
            _run(['mcopy', '-m', '-i', image, os.path.join(staging, name),
                  '::' + name], 'copying %s to /boot' % name)
        syslinux = os.path.join(self.pkgs['syslinux'], 'usr', 'bin',
                                'syslinux')
        _run([syslinux, '--install', image], 'installing syslinux')
        return image, size

    def _assemble(self, disk, boot_img, boot_size, root_img, root_size):
        boot_start = FIRST_PARTITION_SECTOR * SECTOR
        root_start = boot_start + boot_size
        total = root_start + root_size
        with open(disk, 'wb') as f:
            f.truncate(total)
        table = ('label: dos\nlabel-id: %s\nunit: sectors\n\n'
                 'start=%d, size=%d, type=e, bootable\n'
                 'start=%d, size=%d, type=83\n' % (
                     DISK_ID, boot_start // SECTOR, boot_size // SECTOR,
                     root_start // SECTOR, root_size // SECTOR))
        _run(['sfdisk', '--quiet', '--no-reread', '--no-tell-kernel',
              '--wipe', 'never', disk],
             'partitioning', input=table, text=True)
        mbr = os.path.join(self.pkgs['syslinux-common'], 'usr', 'lib',
                           'syslinux', 'mbr', 'mbr.bin')
        with open(mbr, 'rb') as f:
            code = f.read()
        if len(code) > 440:
            raise lab_exception.GuestImageBuildFailed(
                reason='%s is %d bytes, more than the 440 of MBR code'
                       % (mbr, len(code)))
        with open(disk, 'r+b') as f:
            f.write(code)
            _copy_sparse(boot_img, f, boot_start)
            _copy_sparse(root_img, f, root_start)
        return [
            {'number': 1, 'offset': boot_start, 'size': boot_size,
             'filesystem': 'vfat', 'mountpoint': '/boot'},
            {'number': 2, 'offset': root_start, 'size': root_size,
             'filesystem': 'ext4', 'mountpoint': '/'},
        ]


def _write(path, text, mode):
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)


def _round_up(value, unit):
    return int(math.ceil(value / unit)) * unit


def _tree_paths(top):
    """Paths below ``top``, relative, without following symlinks."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            yield os.path.relpath(os.path.join(dirpath, name), top)


def _tree_bytes(top):
    total = 0
    for rel in _tree_paths(top):
        st = os.lstat(os.path.join(top, rel))
        total += _round_up(st.st_size, 4096) if st.st_size else 4096
    return total


def _normalize_tree(top):
    """Modes and mtimes fixed, whatever the umask and the clock.

    Directories become 0755, files 0755 if executable by their owner and
    0644 otherwise; symlinks keep their (meaningless) mode.
    """
    for rel in ['.'] + list(_tree_paths(top)):
        path = os.path.join(top, rel)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(path, 0o755)
        elif stat.S_ISREG(st.st_mode):
            os.chmod(path, 0o755 if st.st_mode & stat.S_IXUSR else 0o644)
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH),
                 follow_symlinks=False)


def _copy_sparse(src, dst, offset):
    """Copy ``src`` into the open file ``dst`` at ``offset``, skipping
    zero blocks (the destination is a fresh sparse file)."""
    zero = bytes(MIB)
    with open(src, 'rb') as f:
        pos = offset
        for chunk in iter(lambda: f.read(MIB), b''):
            if chunk != zero[:len(chunk)]:
                dst.seek(pos)
                dst.write(chunk)
            pos += len(chunk)
