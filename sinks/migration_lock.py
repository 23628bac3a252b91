"""One migrator at a time: a lock that is a table.

Taking the lock creates ``vtp_migration_lock`` without IF NOT EXISTS: the engine lets one
creator of a name win and answers every other TABLE_ALREADY_EXISTS (on a cluster the
creates go through the Keeper DDL queue, which every node runs in the same order). The
table's comment names the holder (host, pid, time, a token of its own); the holder
rewrites it after each statement, so its time says when the holder last made progress.
A waiter retries until VTP_MIGRATION_LOCK_TIMEOUT_S and then fails naming the holder.

A holder that died leaves its lock behind. It is broken (with a warning) when its
process is gone from this host, or when it made no progress for VTP_MIGRATION_LOCK_STALE_S.
Breaking renames the table first, so of two waiters breaking the same stale lock only one
succeeds, and the renamed table's comment proves it was the stale one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from vtp.core.cluster_ddl import LOCK_TABLE, lock_create, lock_drop, lock_rename, lock_touch
from vtp.core.warehouse import Warehouse, WarehouseError, rows

log = logging.getLogger("vtp.migrations")


class MigrationLockTimeout(WarehouseError):
    """Another process held the migration lock for longer than we may wait."""


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as written in the lock table's comment."""

    host: str
    pid: int
    at: float  # when it last made progress (its own clock, Unix seconds)
    token: str
    # Which boot and pid namespace the pid counts in: containers sharing a host name
    # each number their processes from 1, so a pid alone says nothing across them.
    pids: str = ""

    def comment(self) -> str:
        return json.dumps(
            {
                "host": self.host,
                "pid": self.pid,
                "at": self.at,
                "token": self.token,
                "pids": self.pids,
            }
        )

    @classmethod
    def parse(cls, comment: str) -> Holder | None:
        """The holder a comment names; None for a comment vtp did not write."""
        try:
            found = json.loads(comment)
            return cls(
                str(found["host"]),
                int(found["pid"]),
                float(found["at"]),
                str(found["token"]),
                str(found.get("pids", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def __str__(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        return f"{self.host} pid {self.pid} (last progress {when})"


# Tokens of the locks this process holds right now (a thread may migrate while another
# waits): a lock naming this process but none of these was left by an earlier attempt.
_HELD: set[str] = set()


def pid_space() -> str:
    """This process's boot and pid namespace; empty where /proc does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def me(now: float) -> Holder:
    return Holder(socket.gethostname(), os.getpid(), now, uuid.uuid4().hex, pid_space())


def stale_reason(holder: Holder | None, now: float, stale_s: float) -> str | None:
    """Why a lock may be broken, or None while its holder may still be working."""
    if holder is None:
        return "its comment names no holder"
    if now - holder.at > stale_s:
        return f"no progress for {now - holder.at:.0f} s (more than {stale_s:.0f} s)"
    space = pid_space()
    if holder.host != socket.gethostname() or not space or holder.pids != space:
        return None  # its pid counts elsewhere: only its age can tell
    if holder.pid == os.getpid():
        if holder.token in _HELD:
            return None
        return "this process took it in an earlier attempt and is not migrating now"
    if not _alive(holder.pid):
        return f"process {holder.pid} is gone from this host"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def current_holder(warehouse: Warehouse, table: str = LOCK_TABLE) -> tuple[bool, Holder | None]:
    """(whether the lock table exists, the holder its comment names)."""
    found = rows(
        warehouse.query(
            "SELECT comment FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            {"t": table},
        )
    )
    if not found:
        return False, None
    return True, Holder.parse(str(found[0][0]))


def _already_exists(error: WarehouseError) -> bool:
    text = str(error)
    return "TABLE_ALREADY_EXISTS" in text or "Code: 57." in text


@contextlib.contextmanager
def migration_lock(
    warehouse: Warehouse,
    cluster: str,
    timeout_s: float,
    stale_s: float,
    *,
    poll_s: float = 0.5,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Callable[[], None]]:
    """Hold the migration lock inside the block; yields ``progress()``, which the holder
    calls after each statement so its lock does not look stale."""
    holder = me(clock())
    # Known as ours before it exists: another thread of this process that looks at the
    # lock meanwhile must not take it for one an earlier attempt left.
    _HELD.add(holder.token)
    try:
        _take(warehouse, cluster, holder, timeout_s, stale_s, poll_s, clock, sleep)
    except BaseException:
        _HELD.discard(holder.token)
        raise

    def progress() -> None:
        warehouse.execute(lock_touch(replace(holder, at=clock()).comment(), cluster))

    try:
        yield progress
    finally:
        _HELD.discard(holder.token)
        _release(warehouse, cluster, holder)


def _take(
    warehouse: Warehouse,
    cluster: str,
    holder: Holder,
    timeout_s: float,
    stale_s: float,
    poll_s: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> None:
    deadline = clock() + timeout_s
    waited = False
    while True:
        try:
            warehouse.execute(lock_create(holder.comment(), cluster))
            break
        except WarehouseError as exc:
            if not _already_exists(exc):
                # It may have been created all the same (a timeout on a cluster, a lost
                # answer): let go of it if so, rather than wait for it to go stale.
                with contextlib.suppress(WarehouseError):
                    _release(warehouse, cluster, holder, quiet=True)
                raise
        exists, other = current_holder(warehouse)
        if exists and (reason := stale_reason(other, clock(), stale_s)):
            _break(warehouse, cluster, other, reason)
            continue
        if clock() >= deadline:
            raise MigrationLockTimeout(
                f"another process is migrating the warehouse: {other or 'an unknown holder'} "
                f"holds {LOCK_TABLE}; waited {timeout_s:.0f} s (VTP_MIGRATION_LOCK_TIMEOUT_S). "
                f"If that process is gone, drop the table {LOCK_TABLE}"
            )
        if not waited:
            log.info("waiting for the migration lock, held by %s", other)
            waited = True
        sleep(poll_s)
    if waited:
        log.info("took the migration lock")


def _break(warehouse: Warehouse, cluster: str, stale: Holder | None, reason: str) -> None:
    """Remove a stale lock: renamed away first, so only one breaker gets it, then dropped
    once its comment shows it is the lock that was judged stale."""
    aside = f"{LOCK_TABLE}_stale_{uuid.uuid4().hex[:12]}"
    try:
        warehouse.execute(lock_rename(aside, cluster))
    except WarehouseError:
        return  # another waiter broke it (or its holder released it) first: try again
    _, renamed = current_holder(warehouse, aside)
    if renamed != stale:
        # Between our look and the rename a new holder took the lock: give it back.
        try:
            warehouse.execute(lock_rename(LOCK_TABLE, cluster, source=aside))
        except WarehouseError:  # a third one took the name meanwhile: theirs stands
            log.warning("a live migration lock was moved aside as %s and not restored", aside)
        return
    log.warning("broke the migration lock of %s: %s", stale or "an unknown holder", reason)
    warehouse.execute(lock_drop(cluster, aside))


def _release(warehouse: Warehouse, cluster: str, holder: Holder, quiet: bool = False) -> None:
    exists, now_held_by = current_holder(warehouse)
    if exists and now_held_by is not None and now_held_by.token == holder.token:
        warehouse.execute(lock_drop(cluster))
    elif not quiet:
        log.warning(
            "the migration lock was no longer ours when we finished (held by %s): left alone",
            now_held_by,
        )
