"""A thunder deployment emulated on one machine, for the tests, the demo
and the benchmark: network namespaces as hosts, a shaped bridge, RabbitMQ,
and the project's real daemons as subprocesses."""
