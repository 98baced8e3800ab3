"""Lend or return books: ``python get_books.py request|return USER BOOK...`` (see ``--help``)."""

from lending.cli import get_books_main

if __name__ == "__main__":
    get_books_main()
