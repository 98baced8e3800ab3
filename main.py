"""Run a lending worker: ``python main.py WORKER_ID`` (see ``--help``)."""

import signal
import sys

# Ctrl-C during the imports below (a few tenths of a second) ends as it would later:
# exit 130, no traceback. lending.cli's run() puts Python's own handler back.
signal.signal(signal.SIGINT, lambda _signum, _frame: sys.exit(130))

from lending.cli import worker_main  # noqa: E402

if __name__ == "__main__":
    worker_main()
