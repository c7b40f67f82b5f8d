"""A prefork node: the master (arbiter), the worker process, the mesh between workers (wire
format, links, routing by token shard), drain, the state file, systemd and the port check.
"""
