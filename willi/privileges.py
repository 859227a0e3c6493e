"""Who Willi runs as: the configured `user`/`group`, and dropping root to become it.

Willi binds its ports as root, then calls initgroups, setgid and setuid
before it serves anybody, and proves root cannot be regained.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from willi.config import Config, ConfigError


class StartupError(Exception):
    """Willi cannot start; the text is for the operator."""


@dataclass(frozen=True)
class Identity:
    """The account the daemon drops to."""

    user: str
    uid: int
    group: str
    gid: int


def resolve_identity(config: Config) -> Identity | None:
    """The configured `user`/`group`, or None to stay who we are."""
    if not config.user:
        if config.group:
            raise ConfigError(config.path, "group", "is set but user is not; set user as well")
        return None
    try:
        pw = pwd.getpwnam(config.user)
    except KeyError:
        raise ConfigError(config.path, "user", f"no such user {config.user!r}") from None
    if config.group:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError:
            raise ConfigError(config.path, "group", f"no such group {config.group!r}") from None
        group = config.group
    else:
        gid = pw.pw_gid
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
    if os.geteuid() != 0 and (pw.pw_uid != os.geteuid() or gid != os.getegid()):
        raise ConfigError(config.path, "user", f"willi runs as uid {os.geteuid()}, not root, so it cannot "
                          f"switch to {config.user}:{group}; start it as root or remove user/group")
    return Identity(config.user, pw.pw_uid, group, gid)


def root_warning(config: Config, identity: Identity | None) -> str | None:
    if os.geteuid() == 0 and (identity is None or identity.uid == 0):
        return (f"running as root: set user (and group) in {config.path} so that willi drops root "
                "privileges after binding its ports")
    return None


def startup_warnings(config: Config, identity: Identity | None) -> list[str]:
    """What the operator should hear about, though the daemon can run."""
    warnings = [w for w in (root_warning(config, identity),) if w]
    if config.logfile is None and not Path("/dev/log").exists():
        warnings.append("no logfile is set and there is no /dev/log: log messages go to syslog "
                        "over UDP to localhost:514")
    return warnings


def drop_privileges(identity: Identity | None) -> None:
    """initgroups, setgid, setuid; then prove root cannot be regained."""
    if identity is None or os.geteuid() != 0 or identity.uid == 0:
        return
    try:
        os.initgroups(identity.user, identity.gid)
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    except OSError as exc:
        raise StartupError(f"cannot switch to {identity.user}:{identity.group}: {exc.strerror}") from None
    if os.geteuid() != identity.uid or os.getegid() != identity.gid:
        raise StartupError(f"switching to {identity.user}:{identity.group} did not take effect")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise StartupError("root privileges could be regained after dropping them; refusing to run")
