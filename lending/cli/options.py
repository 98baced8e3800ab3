"""What the commands share, written once: the connection options and the ``Target`` they
make, option defaults read from ``Settings``, and ``connected``, the one way to a client.

Every option can also come from an environment variable, shown in ``--help``.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lending.errors import RedisUnavailable
from lending.keys import Keys, namespace_problem
from lending.logs import point_at_devnull
from lending.ops.checker import probe_type
from lending.redaction import redact
from lending.redis.cluster import namespace_url
from lending.redis.connection import check_reachable, make_client
from lending.redis.replies import no_permission
from lending.redis.urls import url_problem
from lending.settings import DEFAULT_REDIS_URL, Settings, Tls

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=click.Command)

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
PASSWORD_NOTE = (
    "A password in the URL is never logged; prefer the REDIS_URL environment variable, "
    "which (unlike an argument) does not show in ps output."
)
_TLS_FILES = (
    ("ca-cert", "CA certificate to trust for rediss:// URLs."),
    ("cert", "Client certificate (when the server asks for one)."),
    ("key", "Client private key (when the server asks for a client certificate)."),
)


def default(name: str) -> Any:
    """The default of the ``Settings`` field ``name``: the command lines restate none."""
    for field in dataclasses.fields(Settings):
        if field.name == name:
            return field.default
    raise KeyError(name)


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot name an address to listen on or connect to, or ``None``: a name
    the IDNA codec refuses (a label over 63 characters, an empty one, a byte that is not
    UTF-8) failed deep inside the socket calls with a traceback."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        host.encode("idna")
    except UnicodeError as exc:
        return f"{host!a} is not a host name: {exc}"
    return None


def check_host(_ctx: click.Context, _param: click.Parameter, host: str | None) -> str | None:
    """A click callback for an address to listen on: ``host_problem`` as a usage error.
    An empty one too: the server would listen on every address without saying so."""
    if host == "":
        raise click.BadParameter("is empty; to listen on every address, say so: 0.0.0.0 (or :: for IPv6 too)")
    if host and (problem := host_problem(host)):
        raise click.BadParameter(problem)
    return host


class FolderPath(click.Path):
    """A folder's path; an empty one, which would quietly be the current folder, is refused."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must name a folder (an empty path would be the current one)", param, ctx)
        return super().convert(value, param, ctx)


def setting_option(*param_decls: str, **attrs: Any) -> Callable[[F], F]:
    """``click.option`` for the ``Settings`` field the option is named after (``--claim-idle-ms``
    is ``claim_idle_ms``): its default, and the environment variable ``LENDING_CLAIM_IDLE_MS``."""
    field = param_decls[0].split("/")[0].removeprefix("--").replace("-", "_")
    attrs = {
        "envvar": f"LENDING_{field.upper()}",
        "show_envvar": True,
        "default": default(field),
        "show_default": True,
        **attrs,
    }
    return click.option(*param_decls, **attrs)


@dataclass(frozen=True)
class Target:
    """The Redis and namespace a command works on.

    :param redis_url: the URL given; ``None`` means the default one (for the worker: the
        default one, else the embedded redis-server).
    :param namespace: the key namespace.
    :param tls: CA and client certificate files for ``rediss://`` URLs.
    """

    redis_url: str | None
    namespace: str
    tls: Tls

    @property
    def url(self) -> str:
        """The URL given, else ``DEFAULT_REDIS_URL``."""
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)


def check_redis_url(_ctx: click.Context, _param: click.Parameter, url: str | None) -> str | None:
    """A ``--redis-url`` callback: a URL the client cannot use is a usage error (exit 2)."""
    if url is not None and (problem := url_problem(url)):
        raise click.BadParameter(problem)
    return url


def check_namespace(_ctx: click.Context, _param: click.Parameter, namespace: str | None) -> str | None:
    """A ``--namespace`` callback: one that cannot name a namespace is a usage error."""
    if namespace is not None and (problem := namespace_problem(namespace)):
        raise click.BadParameter(problem)
    return namespace


def _redis_url_option() -> click.Option:
    return click.Option(
        ["--redis-url"],
        envvar="REDIS_URL",
        show_envvar=True,
        default=None,
        callback=check_redis_url,
        help=f"Redis URL [default: {DEFAULT_REDIS_URL}]. {PASSWORD_NOTE}",
    )


def _namespace_option() -> click.Option:
    return click.Option(
        ["--namespace"],
        envvar="LENDING_NAMESPACE",
        show_envvar=True,
        default=default("namespace"),
        show_default=True,
        callback=check_namespace,
        help="Key namespace: every key starts with {NAMESPACE}.",
    )


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` without ``nan`` and the infinities, which every bound lets
    through (a comparison with ``nan`` is false) and no duration or rate can be."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _tls_option_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            f"--tls-{name}",
            {
                "type": click.Path(exists=True, dir_okay=False),
                "show_envvar": True,
                "default": None,
                "envvar": f"LENDING_TLS_{name.upper().replace('-', '_')}",
                "help": text,
            },
        )
        for name, text in _TLS_FILES
    ]


def _around(command: C, first: Sequence[click.Parameter], last: Sequence[click.Parameter]) -> C:
    """Put ``first`` after ``command``'s arguments, before its own options, and ``last`` after them."""
    arguments = [param for param in command.params if isinstance(param, click.Argument)]
    own = [param for param in command.params if not isinstance(param, click.Argument)]
    command.params = [*arguments, *first, *own, *last]
    return command


def connection_options(command: C) -> C:
    """Give ``command`` --redis-url, --namespace and the --tls-* options, and hand their values
    to its callback as one ``target: Target``.

    Goes above ``@click.command``: --redis-url and --namespace come before the command's
    own options in ``--help``, the TLS options after them.
    """
    callback = command.callback
    assert callback is not None  # click.command always sets one

    @functools.wraps(callback)
    def with_target(redis_url: str | None, namespace: str, **options: Any) -> Any:
        return callback(target=Target(redis_url, namespace, tls_from_options(options)), **options)

    command.callback = with_target
    tls = [click.Option([name], **attrs) for name, attrs in _tls_option_specs()]
    return _around(command, [_redis_url_option(), _namespace_option()], tls)


def namespace_option(command: C) -> C:
    """--namespace alone, for a command that needs no Redis; goes above ``@click.command``."""
    return _around(command, [_namespace_option()], [])


def tls_options(command: F) -> F:
    """--tls-ca-cert, --tls-cert and --tls-key, as ``click.option`` decorators (for a command
    with a --redis-url of its own, such as the simulator's); see ``tls_from_options``."""
    for name, attrs in reversed(_tls_option_specs()):
        command = click.option(name, **attrs)(command)
    return command


def tls_from_options(options: dict[str, Any]) -> Tls:
    """Take the TLS options out of ``options``."""
    return Tls(options.pop("tls_ca_cert", None), options.pop("tls_cert", None), options.pop("tls_key", None))


class CommandError(click.ClickException):
    """Ends a command with one line ``error: <message>`` on stderr and ``exit_code`` (1);
    a URL in the message shows no password."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {redact(self.format_message())}", file=file, err=True)


@asynccontextmanager
async def connected(target: Target) -> AsyncIterator[Redis]:
    """A client of ``target`` (for a cluster, of the master owning its namespace), checked
    to answer, and closed on leaving.

    :raises CommandError: Redis cannot be reached, is lost or stalls while the command
        runs, or refused a command (for want of a permission the command's ACL user lacks,
        or a key of the wrong type); the command says why in one line and exits 1.
    """
    client: Redis | None = None
    try:
        client = make_client(await namespace_url(target.url, target.namespace, target.tls), tls=target.tls)
        await check_reachable(client, target.url)
    except RedisUnavailable as exc:
        if client is not None:
            await client.aclose()
        raise CommandError(str(exc)) from exc
    try:
        yield client
    except ResponseError as exc:
        if (refusal := no_permission(exc)) is not None:
            raise CommandError(f"no permission: {refusal}") from exc
        if "WRONGTYPE" in str(exc):
            raise CommandError(f"Redis refused a command: {await wrong_types(client, target.keys)}") from exc
        # A stream out of IDs, out of memory...: the namespace needs a look.
        raise CommandError(f"Redis refused a command: {str(exc) or type(exc).__name__}") from exc
    except (RedisConnectionError, RedisTimeoutError, InvalidResponse) as exc:
        raise CommandError(f"lost Redis at {target.url}: {str(exc) or type(exc).__name__}") from exc
    finally:
        await client.aclose()


async def wrong_types(client: Redis, keys: Keys) -> str:
    """Which of the namespace's keys hold another type than theirs, in words (read with
    commands the operator's ACL allows: ``checker.probe_type``)."""
    fixed = keys.fixed_types()
    try:
        async with client.pipeline(transaction=False) as pipe:
            for key, kind in fixed.items():
                probe_type(pipe, key, kind)
            replies = await pipe.execute(raise_on_error=False)
    except RedisError:
        replies = []
    named = [
        f"{key} holds another type than a {kind}"
        for (key, kind), reply in zip(fixed.items(), replies, strict=False)
        if isinstance(reply, ResponseError) and "WRONGTYPE" in str(reply)
    ]
    if len(named) == 1:
        return f"{named[0]}: move it away or delete it"
    if named:
        return "; ".join(named) + ": move them away or delete them"
    return "a key of the namespace holds another type than the service keeps in it (python -m lending check names it)"


def print_result(result: str) -> None:
    """Print ``result`` on stdout, or, when that fails (full, or closed), on stderr: whoever
    ran the command learns what was done either way, and the exit code still tells it."""
    try:
        click.echo(result)
    except OSError as exc:
        discard_stdout()
        click.echo(f"error: cannot write to stdout ({exc.strerror or exc}): {result}", err=True)


def discard_stdout() -> None:
    """Drop stdout for good once writing to it failed (``point_at_devnull``)."""
    point_at_devnull(sys.stdout)
