"""Lend or return books: ``python get_books.py request|return USER BOOK...`` (see ``--help``)."""

from lending.interrupts import quiet_while_importing

quiet_while_importing()  # Ctrl-C during the imports below: exit 130, no traceback

from lending.cli import get_books_main  # noqa: E402

if __name__ == "__main__":
    get_books_main()
