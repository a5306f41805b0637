"""A discrete-event simulator of boot storms.

The same model as the emulated benchmark (:mod:`thunder_lab.bench`) —
relay trees from the coordinator's tree policy plugin, links of given
bandwidth shared by their transfers, copy-on-read caches at cache-block
granularity, trace prefetch, VMs replaying a boot trace — at scales the
emulation cannot reach: 10,000 hosts in minutes.
"""
