"""tests/multiprocess holds the worker of a two-process check; nothing here
is collected (worker.py starts jax.distributed when run as a script, and
tests/test_sharding.py runs it in two child processes)."""

collect_ignore_glob = ["*"]
