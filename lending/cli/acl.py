"""``python -m lending acl``: print the least-privilege ACL users of a namespace (``ops.acl``)."""

from __future__ import annotations

import click

from lending.cli.options import CONTEXT_SETTINGS, namespace_option
from lending.keys import Keys
from lending.ops.acl import (
    api_user_rules,
    operator_user_rules,
    sender_user_rules,
    setuser_command,
    worker_user_rules,
)


@namespace_option
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--service-user", default="lending", show_default=True)
@click.option("--sender-user", default="get-books", show_default=True)
@click.option("--operator-user", default="lending-operator", show_default=True)
@click.option(
    "--api-user",
    default=None,
    metavar="NAME",
    help="Also print a user NAME for the HTTP API (python -m lending api), as a fourth line.",
)
@click.option(
    "--redis",
    "version",
    type=click.Choice(["7", "6.2"]),
    default="7",
    show_default=True,
    help="The Redis the users are for: 7.x (read-only and write-only key patterns) or 6.2.",
)
def acl_command(
    namespace: str, service_user: str, sender_user: str, operator_user: str, api_user: str | None, version: str
) -> None:
    """Print ACL SETUSER commands for least-privilege users of NAMESPACE, one per line:
    the service (only {NAMESPACE}:* keys, only the commands the worker uses: no SCAN,
    SELECT or CONFIG), the sender of get_books (hands requests in through the inbox,
    reads events: no XADD, which would let it trim or block the request streams) and
    a read-only operator (status, check, dead-letters list); with --api-user, also
    the HTTP API (queues checked requests, reads what it shows; writes no lending
    state). Each also works on a Redis Cluster. Replace <password> before running them; never put it in a command
    line that others can see in ps."""
    key_permissions = version == "7"
    if not key_permissions:
        events = Keys(namespace).events
        click.echo(
            "# Redis 6.2 has no read-only or write-only keys: before the first event, the sender could "
            f"create {events} as a list and stop the service; make sure {events} exists first "
            "(it does once a request was answered)."
            + (
                " The API user could write any key of the namespace through the commands it has "
                "(XADD, SET, XDEL): forge events, change a user's count. Redis 7 has no such gaps."
                if api_user
                else " Redis 7 has no such gap."
            ),
            err=True,
        )
    click.echo(setuser_command(service_user, worker_user_rules(namespace)))
    click.echo(setuser_command(sender_user, sender_user_rules(namespace, key_permissions=key_permissions)))
    click.echo(setuser_command(operator_user, operator_user_rules(namespace, key_permissions=key_permissions)))
    if api_user:
        click.echo(setuser_command(api_user, api_user_rules(namespace, key_permissions=key_permissions)))
