"""Run a lending worker: ``python main.py WORKER_ID`` (see ``--help``)."""

from lending.cli import worker_main

if __name__ == "__main__":
    worker_main()
