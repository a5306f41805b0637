"""QEMU guests for the lab: the bootable test image, booting it, and the
harness that runs tests inside a stock Debian kernel."""
