from lending.interrupts import quiet_while_importing

quiet_while_importing()  # Ctrl-C during the imports below: exit 130, no traceback

from lending.cli import lending_main  # noqa: E402

lending_main()
