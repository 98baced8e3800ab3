"""``python -m lending acl``: print the least-privilege ACL users of a namespace (``ops.acl``)."""

from __future__ import annotations

import click

from lending.cli.options import CONTEXT_SETTINGS, namespace_option
from lending.ops.acl import sender_user_rules, setuser_command, worker_user_rules


@namespace_option
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--service-user", default="lending", show_default=True)
@click.option("--sender-user", default="get-books", show_default=True)
def acl_command(namespace: str, service_user: str, sender_user: str) -> None:
    """Print ACL SETUSER commands for least-privilege users of NAMESPACE: the service
    (only {NAMESPACE}:* keys, only the commands it uses) and get_books (add requests,
    read events). Replace <password> before running them; never put it in a command
    line that others can see in ps."""
    click.echo(setuser_command(service_user, worker_user_rules(namespace)))
    click.echo(setuser_command(sender_user, sender_user_rules(namespace)))
