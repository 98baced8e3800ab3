"""Keeping passwords out of output: the one helper every message, log line and report
goes through before anyone can read it.

It works on any text, not only on a URL: a message that embeds a URL (``cannot reach
Redis at redis+cluster://user:pw@h1:p1,h2:p2: ...``) loses the password wherever it is.
"""

from __future__ import annotations

import re

# scheme://credentials@ : the credentials run to the last "@" of the URL (a password may
# hold an unencoded "@"); hiding too much is fine, hiding too little is not.
_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<credentials>\S*)@")
# redis-py also takes the password as a query argument (``redis://host/0?password=...``).
_QUERY_PASSWORD = re.compile(r"(?P<name>[?&]password=)[^&#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    ``user:password@`` keeps the user; a lone ``secret@`` (some clients read it as a
    password) is hidden as a whole.
    """
    return _QUERY_PASSWORD.sub(r"\g<name>***", _CREDENTIALS.sub(_hide, text))


def _hide(match: re.Match[str]) -> str:
    user, colon, _ = match["credentials"].partition(":")
    return f"{match['scheme']}{user + ':***' if colon else '***'}@"
