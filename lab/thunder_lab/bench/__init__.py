"""The boot-storm benchmark behind ``thunder-bench``.

One run boots (or replays the boot of) V VMs on each of H emulated hosts at
once, for several ways of getting the image to the hosts side by side, and
measures how long the storm takes, how much the origin sent and how close
that is to the physical bound. See :mod:`thunder_lab.bench.runner`.
"""
