"""A tiny bootable disk: proof that a guest booted from a thunder disk.

Its boot sector (assembled here with binutils) is run by SeaBIOS. It reads
the sector at ``READ_LBA`` (deep in the image, so through the template)
and prints the marker found there on the first serial port, then writes
``WRITE_MARK`` to the sector at ``WRITE_LBA`` and prints ``:WRITE-OK``.
A failed disk request prints ``:DISK-ERROR``.
"""

import os
import shutil
import subprocess
import tempfile

SECTOR = 512
READ_LBA = 2048
WRITE_LBA = 4096
MARKER = b'THUNDER-MARKER-7f3a'
WRITE_MARK = b'WRITTEN-BY-GUEST'

BOOT_SECTOR_ASM = r'''
        .code16
        .globl _start
_start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7c00, %sp
        sti
        mov %dl, drive
        mov $hello, %si
        call puts
        mov read_lba, %eax
        mov %eax, dap_lba
        mov $0x42, %ah              /* extended read */
        mov drive, %dl
        mov $dap, %si
        int $0x13
        jc fail
        mov $0x8000, %si
        call puts
        mov $wmsg, %si
        mov $0x8000, %di
        mov $wmsg_len, %cx
        rep movsb
        mov write_lba, %eax
        mov %eax, dap_lba
        mov $0x4300, %ax            /* extended write */
        mov drive, %dl
        mov $dap, %si
        int $0x13
        jc fail
        mov $done, %si
        call puts
halt:   cli
        hlt
        jmp halt
fail:   mov $err, %si
        call puts
        jmp halt
puts:   lodsb
        test %al, %al
        jz 1f
        mov $0x3f8, %dx
        out %al, (%dx)
        jmp puts
1:      ret

        .balign 4
dap:    .byte 16, 0
        .word 1
        .word 0x8000, 0
dap_lba: .long 0, 0
drive:  .byte 0
hello:  .asciz "BOOT:"
done:   .asciz ":WRITE-OK\n"
err:    .asciz ":DISK-ERROR\n"
wmsg:   .ascii "@WRITE_MARK@"
        .byte 0
        .set wmsg_len, . - wmsg
        # One partition over the whole disk (16 MiB), as the MBR of a
        # partitioned disk has: image safety checks (oslo.utils'
        # format_inspector, as Nova's) refuse an MBR without any.
        .org 0x1be
        .byte 0x80, 0, 2, 0, 0x83, 0xfe, 0xff, 0xff
        .long 1, 32767
        .org 0x1f0
read_lba:  .long @READ_LBA@
write_lba: .long @WRITE_LBA@
        .org 510
        .word 0xaa55
'''


class ToolsMissing(RuntimeError):
    pass


def boot_sector():
    if not (shutil.which('as') and shutil.which('ld')):
        raise ToolsMissing('as/ld not installed (Debian package binutils)')
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, 'boot.S')
        with open(source, 'w') as f:
            f.write(BOOT_SECTOR_ASM
                    .replace('@WRITE_MARK@', WRITE_MARK.decode())
                    .replace('@READ_LBA@', str(READ_LBA))
                    .replace('@WRITE_LBA@', str(WRITE_LBA)))
        obj, out = os.path.join(tmp, 'boot.o'), os.path.join(tmp, 'boot')
        subprocess.run(['as', '--32', '-o', obj, source], check=True,
                       capture_output=True)
        subprocess.run(['ld', '-m', 'elf_i386', '-Ttext', '0x7c00',
                        '--oformat', 'binary', '-o', out, obj], check=True,
                       capture_output=True)
        with open(out, 'rb') as f:
            sector = f.read()
    assert len(sector) == SECTOR and sector.endswith(b'\x55\xaa')
    return sector


def make(path, size=16 << 20):
    """Write the bootable raw image to *path*."""
    sector = boot_sector()
    with open(path, 'wb') as f:
        f.truncate(size)
        f.write(sector)
        f.seek(READ_LBA * SECTOR)
        f.write(MARKER + b'\0')
    return path


def expected_console():
    return 'BOOT:%s:WRITE-OK' % MARKER.decode()
