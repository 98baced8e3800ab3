"""Lend or return books: ``python get_books.py request|return USER BOOK...`` (see ``--help``)."""

import signal
import sys

# Ctrl-C during the imports below (a few tenths of a second) ends as it would later:
# exit 130, no traceback. lending.cli's run() puts Python's own handler back.
signal.signal(signal.SIGINT, lambda _signum, _frame: sys.exit(130))

from lending.cli import get_books_main  # noqa: E402

if __name__ == "__main__":
    get_books_main()
