import signal
import sys

# Ctrl-C during the imports below ends as it would later (see main.py).
signal.signal(signal.SIGINT, lambda _signum, _frame: sys.exit(130))

from lending.cli import lending_main  # noqa: E402

lending_main()
