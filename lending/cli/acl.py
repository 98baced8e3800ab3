"""``python -m lending acl``: print the least-privilege ACL users of a namespace (``ops.acl``)."""

from __future__ import annotations

import click

from lending.cli.options import CONTEXT_SETTINGS, namespace_option
from lending.keys import Keys
from lending.ops.acl import (
    api_user_rules,
    namespace_acl_problem,
    operator_user_rules,
    sender_user_rules,
    setuser_command,
    user_name_problem,
    worker_user_rules,
)


def _check_user(_ctx: click.Context, _param: click.Parameter, name: str | None) -> str | None:
    """A user name that would garble its printed command is a usage error."""
    if name is not None and (problem := user_name_problem(name)):
        raise click.BadParameter(problem)
    return name


@namespace_option
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--service-user", default="lending", show_default=True, callback=_check_user)
@click.option("--sender-user", default="get-books", show_default=True, callback=_check_user)
@click.option("--operator-user", default="lending-operator", show_default=True, callback=_check_user)
@click.option(
    "--api-user",
    default=None,
    metavar="NAME",
    callback=_check_user,
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
    named = {"--service-user": service_user, "--sender-user": sender_user, "--operator-user": operator_user}
    if api_user is not None:
        named["--api-user"] = api_user
    if problem := namespace_acl_problem(namespace):
        raise click.BadParameter(problem, param_hint="'--namespace'")
    # Each ACL SETUSER starts with reset: a second one of a name would undo the first.
    first_of: dict[str, str] = {}
    for option, name in named.items():
        if name in first_of:
            raise click.UsageError(f"{first_of[name]} and {option} both name user {name!r}: give each role its own")
        first_of[name] = option
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
                if api_user is not None
                else " Redis 7 has no such gap."
            ),
            err=True,
        )
    click.echo(setuser_command(service_user, worker_user_rules(namespace)))
    click.echo(setuser_command(sender_user, sender_user_rules(namespace, key_permissions=key_permissions)))
    click.echo(setuser_command(operator_user, operator_user_rules(namespace, key_permissions=key_permissions)))
    if api_user is not None:
        click.echo(setuser_command(api_user, api_user_rules(namespace, key_permissions=key_permissions)))
