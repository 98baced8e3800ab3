"""Run a lending worker: ``python main.py WORKER_ID`` (see ``--help``)."""

from lending.interrupts import quiet_while_importing

quiet_while_importing()  # Ctrl-C during the imports below: exit 130, no traceback

from lending.cli import worker_main  # noqa: E402

if __name__ == "__main__":
    worker_main()
