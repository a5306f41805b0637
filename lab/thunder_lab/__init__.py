"""The nova-thunder lab: what proves and measures the project, apart from
what a compute node installs.

* :mod:`thunder_lab.emulation` — a whole deployment on one machine: hosts
  as network namespaces on a shaped bridge, RabbitMQ, the coordinator,
  origins and real ``thunder-agent`` processes;
* :mod:`thunder_lab.bench` — the boot-storm benchmark (``thunder-bench``)
  and the concurrency benchmark of one agent (``thunder-bench-agent``);
* :mod:`thunder_lab.sim` — the discrete-event simulator (``thunder-sim``);
* :mod:`thunder_lab.guest` — the bootable test image, QEMU guests, and the
  harness that runs the kernel backend's tests inside a stock Debian
  kernel (``tools/guest-run``);
* :mod:`thunder_lab.trace_recorder` — recording boot traces
  (``thunder-trace``).

It is its own distribution (``nova-thunder-lab``, ``lab/pyproject.toml``),
installed by ``tools/bootstrap.sh`` for the demo and the tests; operators do
not need it.
"""
