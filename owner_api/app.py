"""The owner-facing HTTP API of one region (FastAPI; the OpenAPI document at /openapi.json).

Every data route resolves the caller first (``Caller``): a valid token of this region,
a live grant for delegated tokens, an owner known here. Each route then reads only that
owner's slice, only the columns the caller's scopes open (owner_api.scopes), and
records the access in the audit log with the rows returned. Every 4xx answer, the
framework's own included, is ``{"error": code, "message": text}``.
"""

# No `from __future__ import annotations` here: FastAPI must see the dependency aliases
# (Who, Owner, ...) defined inside create_app when it reads the route signatures.
import contextlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from owner_api import store
from owner_api.analyst import AnalystLimits, AnalystQueryError, result_rows, run_analyst_query
from owner_api.audit import AuditEntry, AuditLog
from owner_api.erasure import ErasureJobs
from owner_api.export import ClosingStream, stream_export
from owner_api.known import KnownOwners
from owner_api.scopes import ROUTE_SCOPE, SCOPES, SIGNAL_SCOPE, visible_columns
from owner_api.tokens import Claims, TokenError, issue, verify
from owner_api.worker_notice import WorkerNotice
from vtp.core import metrics
from vtp.core.keys import KeyFolder
from vtp.core.settings import Settings
from vtp.core.warehouse import Warehouse

log = logging.getLogger("vtp.owner_api")

MAX_RANGE_DAYS = 366
VIN_IN_PATH = re.compile(r"/[A-HJ-NPR-Z0-9]{17}(?=/|$)")
VIN = Path(pattern=r"^[A-HJ-NPR-Z0-9]{17}$", description="17-character VIN")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ErrorBody(BaseModel):
    error: str
    message: str


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 429)
}


class AnalystQuery(BaseModel):
    sql: str = Field(min_length=1, max_length=20_000)


class SamplesPage(BaseModel):
    vin: str
    signals: list[str]
    samples: list[dict[str, Any]] = Field(description="event_time, seq and the signals")
    next: str | None = Field(description="the cursor of the next page; null on the last")


class GrantRequest(BaseModel):
    party: str = Field(min_length=1, max_length=200, description="who receives the grant")
    scopes: list[str] = Field(min_length=1, description=f"any of {', '.join(SCOPES)}")
    expires_in_s: int = Field(ge=60, le=366 * 86400, description="lifetime of the grant")


@dataclass(frozen=True)
class Caller:
    claims: Claims
    request_id: str

    @property
    def owner(self) -> str:
        return self.claims.owner_id


def _ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def _time_range(start: datetime | None, end: datetime | None, default_days: int) -> tuple[int, int]:
    end_ms = _ms(end) if end else store.now_ms()
    start_ms = _ms(start) if start else end_ms - default_days * 86_400_000
    if start_ms >= end_ms:
        raise ApiError(400, "bad_time_range", "start must be before end")
    if end_ms - start_ms > MAX_RANGE_DAYS * 86_400_000:
        raise ApiError(400, "bad_time_range", f"a time range spans at most {MAX_RANGE_DAYS} days")
    return start_ms, end_ms


def _local_dates(
    start: datetime | None, end: datetime | None, default_days: int
) -> tuple[str, str]:
    """[first, after) local dates of a window, each in the offset the caller wrote it in
    (UTC when none): the days a summary is about are local days, not UTC ones."""
    end = end or datetime.now(UTC)
    start = start or end - timedelta(days=default_days)

    def local(value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    last = (local(end) - timedelta(microseconds=1)).date()  # the end itself is excluded
    return local(start).date().isoformat(), (last + timedelta(days=1)).isoformat()


HTTP_CODES = {
    400: "bad_parameter",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "too_large",
    415: "unsupported_media_type",
}
MAX_BODY_BYTES = 1 << 20  # no route takes more; bigger bodies are refused before reading


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413 before the app reads it (a
    body is read before the route checks its token)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(send, self.limit)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"error": "too_large", "message": f"bodies are at most {limit} bytes"})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


def token_error(exc: TokenError) -> "ApiError":
    if exc.reason == "wrong_region":
        return ApiError(403, "wrong_region", str(exc))
    return ApiError(401, f"{exc.reason}_token", str(exc))


def create_app(
    settings: Settings,
    warehouse: Warehouse,
    keys: KeyFolder,
    erasure_lock: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
    sink_health: Callable[[], Mapping[str, object]] = lambda: {"state": "off"},
) -> FastAPI:
    region = settings.need_region()
    app = FastAPI(
        title="vtp owner API",
        version="1",
        description=f"An owner's own vehicle data in region {region}: read, export, share, "
        "erase, and the log of every access.",
    )
    wh = warehouse
    audit_log = AuditLog(wh)
    known = KnownOwners(
        lambda owner: store.owner_known(wh, owner),
        lambda owner, vin: store.owns_vehicle(wh, owner, vin),
    )
    analyst_limits = AnalystLimits.from_settings(settings)
    # Each analyst query may use its memory limit; only so many run at once.
    analyst_slots = threading.BoundedSemaphore(settings.analyst_max_concurrent)
    app.add_middleware(BodyLimit)

    @app.exception_handler(ApiError)
    def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        who = getattr(request.state, "caller", None)
        if who is not None:  # refused after the caller was known: that attempt is logged too
            resource, detail = request.url.path, f"{exc.code}: {exc.message}"
            if not getattr(request.state, "vehicle_is_callers", False):
                # A VIN not (yet) shown to be the caller's may be another owner's: it
                # goes into nobody's log, whatever the refusal was about.
                resource = VIN_IN_PATH.sub("/<vin>", resource)
                detail = exc.code
            audit(who, "denied", resource, 0, detail, exc.status)
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(
            {"error": code, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"error": "bad_parameter", "message": problems}, status_code=400)

    def audit(
        caller: Caller, action: str, resource: str, rows: int, detail: str = "", status: int = 200
    ) -> None:
        audit_log.record(
            AuditEntry(
                caller.owner,
                caller.request_id,
                caller.claims.actor,
                caller.claims.grant_id or "",
                action,
                resource,
                detail,
                rows,
                status,
            ),
        )

    def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError(401, "missing_token", "send Authorization: Bearer <token>")
        try:
            claims = verify(
                keys.ring(),
                authorization.removeprefix("Bearer ").strip(),
                region,
                ("owner", "grant"),
                settings.owner_token_max_ttl_s,
            )
        except TokenError as exc:
            raise token_error(exc) from None
        if not claims.is_owner:
            # Looked up every time, so revoking takes effect at once. The token's own
            # expiry is the grant's, checked by verify().
            grant = store.get_grant(wh, claims.owner_id, claims.grant_id or "")
            if grant is None or grant["revoked_at"] is not None:
                raise ApiError(401, "revoked_token", "the grant behind this token was revoked")
        if not known.owner_known(claims.owner_id):
            raise ApiError(
                404, "unknown_owner", f"owner {claims.owner_id!r} has no data in {region!r}"
            )
        who = Caller(claims, uuid.uuid4().hex)
        request.state.caller = who
        return who

    def owner_only(who: Annotated[Caller, Depends(caller)]) -> Caller:
        if not who.claims.is_owner:
            raise ApiError(403, "owner_only", "only the owner may do this, not a grant's party")
        return who

    def needs(who: Caller, scope: str, what: str) -> None:
        if scope not in who.claims.scopes:
            raise ApiError(403, "missing_scope", f"{what} needs the {scope!r} scope")

    def vehicle_of(request: Request, who: Caller, vin: str) -> str:
        if not known.owns_vehicle(who.owner, vin):
            raise ApiError(404, "unknown_vehicle", "that vehicle is not one of this owner's")
        request.state.vehicle_is_callers = True
        return vin

    Who = Annotated[Caller, Depends(caller)]
    Owner = Annotated[Caller, Depends(owner_only)]
    Start = Annotated[datetime | None, Query(description="ISO 8601; default: end minus 30 days")]
    End = Annotated[datetime | None, Query(description="ISO 8601, exclusive; default: now")]
    Limit = Annotated[int, Query(ge=1, le=10_000)]

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        """Reads are served whatever the sink does; "degraded" says new data is not
        being stored right now (the sink is restarting, see ``sink.error``)."""
        sink = sink_health()
        status = "ok" if sink["state"] in ("running", "off") else "degraded"
        return {"status": status, "region": region, "sink": sink}

    @app.get("/v1/me", responses=ERRORS)
    def me(who: Who) -> dict[str, Any]:
        audit(who, "read", "me", 1)
        c = who.claims
        return {
            "owner_id": c.owner_id,
            "region": c.region,
            "actor": c.actor,
            "grant_id": c.grant_id,
            "scopes": list(c.scopes),
            "token_expires_at": store.jsonable(datetime.fromtimestamp(c.expires_at, UTC)),
        }

    @app.get("/v1/vehicles", responses=ERRORS)
    def vehicles(who: Who) -> dict[str, Any]:
        found = store.vehicles(wh, who.owner)
        audit(who, "read", "vehicles", len(found))
        return {"vehicles": found}

    @app.get("/v1/vehicles/{vin}/samples", responses={**ERRORS, 200: {"model": SamplesPage}})
    def samples(
        request: Request,
        who: Who,
        vin: Annotated[str, VIN],
        start: Start = None,
        end: End = None,
        signals: Annotated[
            str | None, Query(description=f"comma-separated, of {', '.join(SIGNAL_SCOPE)}")
        ] = None,
        limit: Limit = 1000,
        cursor: Annotated[str | None, Query(description="`next` of the previous page")] = None,
    ) -> Response:
        start_ms, end_ms = _time_range(start, end, 30)
        asked = list(dict.fromkeys(s for s in (signals or "").split(",") if s))  # once each
        wanted = asked or [s for s, scope in SIGNAL_SCOPE.items() if scope in who.claims.scopes]
        unknown = [s for s in wanted if s not in SIGNAL_SCOPE]
        if unknown:
            raise ApiError(
                400, "unknown_signal", f"unknown signals {unknown}; known: {list(SIGNAL_SCOPE)}"
            )
        for s in wanted:
            needs(who, SIGNAL_SCOPE[s], f"signal {s!r}")
        after = _parse_cursor(cursor)
        vehicle_of(request, who, vin)
        page, nxt = store.samples_page(wh, who.owner, vin, start_ms, end_ms, wanted, limit, after)
        audit(who, "read", f"samples/{vin}", len(page), f"signals={','.join(wanted)}")
        head = {"vin": vin, "signals": wanted}
        tail = {"next": f"{nxt[0]}.{nxt[1]}" if nxt else None}
        # {"vin": ..., "signals": [...], "samples": [<the rows as ClickHouse wrote them>],
        # "next": ...}: the rows are joined, not parsed and written again.
        body = b"".join(
            (
                json.dumps(head)[:-1].encode(),
                b', "samples": [',
                b", ".join(page),
                b"], ",
                json.dumps(tail)[1:].encode(),
            )
        )
        return Response(body, media_type="application/json")

    def session_route(table: store.Table, resource: str) -> Callable[..., dict[str, Any]]:
        def read(
            request: Request,
            who: Who,
            vin: Annotated[str | None, Query(pattern=r"^[A-HJ-NPR-Z0-9]{17}$")] = None,
            start: Start = None,
            end: End = None,
            limit: Limit = 100,
        ) -> dict[str, Any]:
            start_ms, end_ms = _time_range(start, end, 30)
            needs(who, ROUTE_SCOPE[table.name] or "", resource)
            if vin is not None:
                vehicle_of(request, who, vin)
            columns = visible_columns(table.name, who.claims.scopes)
            dates = _local_dates(start, end, 30) if table is store.DAYS else None
            found = store.sessions(
                wh, table, who.owner, vin, start_ms, end_ms, columns, limit, dates
            )
            audit(who, "read", resource, len(found))
            return {resource.replace("-", "_"): found}

        read.__name__ = resource.replace("-", "_")
        return read

    app.get("/v1/trips", responses=ERRORS)(session_route(store.TRIPS, "trips"))
    app.get("/v1/charges", responses=ERRORS)(session_route(store.CHARGES, "charges"))
    app.get("/v1/daily-summaries", responses=ERRORS)(session_route(store.DAYS, "daily-summaries"))

    @app.post("/v1/grants", responses=ERRORS, status_code=201)
    def create_grant(who: Owner, body: GrantRequest) -> dict[str, Any]:
        unknown = sorted(set(body.scopes) - set(SCOPES))
        if unknown:
            raise ApiError(400, "unknown_scope", f"unknown scopes {unknown}; known: {list(SCOPES)}")
        expires_ms = store.now_ms() + body.expires_in_s * 1000
        scopes = sorted(set(body.scopes))
        grant = store.create_grant(wh, who.owner, body.party, scopes, expires_ms)
        token = issue(
            keys.ring(),
            Claims(
                who.owner,
                region,
                expires_ms // 1000,
                grant["grant_id"],
                body.party,
                tuple(scopes),
                kind="grant",
            ),
        )
        audit(who, "grant", f"grants/{grant['grant_id']}", 1, f"party={body.party} scopes={scopes}")
        return {"grant": grant, "token": token}

    @app.get("/v1/grants", responses=ERRORS)
    def list_grants(who: Owner) -> dict[str, Any]:
        found = store.list_grants(wh, who.owner)
        audit(who, "read", "grants", len(found))
        return {"grants": found}

    @app.delete("/v1/grants/{grant_id}", responses=ERRORS)
    def revoke_grant(
        who: Owner, grant_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
    ) -> dict[str, Any]:
        grant = store.revoke_grant(wh, who.owner, grant_id)
        if grant is None:
            raise ApiError(404, "unknown_grant", f"grant {grant_id} is not one of this owner's")
        audit(who, "revoke", f"grants/{grant_id}", 1)
        return {"grant": grant}

    @app.get(
        "/v1/export",
        responses={**ERRORS, 200: {"content": {"application/zip": {}}, "description": "ZIP"}},
    )
    def export(
        who: Owner,
        format: Annotated[str, Query(pattern="^(jsonl|csv|parquet)$")] = "jsonl",
    ) -> StreamingResponse:
        generated = store.jsonable(datetime.now(UTC))

        def pages(table: store.Table) -> Iterator[Any]:
            rows = settings.export_page_rows
            if format == "parquet":
                return store.export_pages(wh, who.owner, table, rows)
            return store.export_text_pages(wh, who.owner, table, format, rows)

        tables = [(t.name, lambda t=t: pages(t)) for t in store.EXPORT_TABLES]

        def done(counts: dict[str, int], ended: str | None) -> None:
            if ended is None:
                audit(who, "export", "export", sum(counts.values()), f"format={format} {counts}")
            else:  # what was handed out before it stopped, and why it stopped
                detail = f"format={format} incomplete ({ended}): {counts}"
                audit(who, "export", "export", sum(counts.values()), detail, 499)

        body = stream_export(who.owner, region, format, tables, str(generated), done)
        name = f"vtp-export-{who.owner}-{region}.zip"
        return ClosingStream(
            body,
            media_type="application/zip",
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Request-Id": who.request_id,
            },
        )

    def erased(owner: str, erasure_id: str, deleted: dict[str, int]) -> None:
        """A finished erasure's row in the (now empty) log: of the past only this remains."""
        known.forget(owner)
        actor = Caller(Claims(owner, region, 0), uuid.uuid4().hex)
        audit(actor, "erase", "owner", sum(deleted.values()), f"erasure_id={erasure_id}")

    jobs = ErasureJobs(
        wh, erasure_lock, erased, WorkerNotice(settings), region, settings.warehouse_cluster
    )
    app.state.erasure_jobs = jobs

    @app.post("/v1/erasure", responses=ERRORS, status_code=202)
    def erase(who: Owner) -> dict[str, Any]:
        erasure_id = jobs.submit(who.owner)
        known.forget(who.owner)
        audit(who, "erase requested", "owner", 0, f"erasure_id={erasure_id}", 202)
        return {"erasure": _erasure(who.owner, erasure_id)}

    def _erasure(owner: str, erasure_id: str) -> dict[str, Any]:
        found = [e for e in store.erasures(wh, owner) if e["erasure_id"] == erasure_id]
        if not found:
            raise ApiError(404, "unknown_erasure", "that erasure is not one of this owner's")
        return found[0]

    @app.get("/v1/erasures", responses=ERRORS)
    def list_erasures(who: Owner) -> dict[str, Any]:
        found = store.erasures(wh, who.owner)
        audit(who, "read", "erasures", len(found))
        return {"erasures": found}

    @app.get("/v1/erasures/{erasure_id}", responses=ERRORS)
    def get_erasure(
        who: Owner, erasure_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
    ) -> dict[str, Any]:
        found = _erasure(who.owner, erasure_id)
        audit(who, "read", f"erasures/{erasure_id}", 1)
        return {"erasure": found}

    @app.get("/v1/audit", responses=ERRORS)
    def access_log(who: Owner, limit: Limit = 1000) -> dict[str, Any]:
        found = store.access_log(wh, who.owner, limit)
        audit(who, "read", "audit", len(found))
        return {"entries": found}

    @app.post("/v1/analyst/sql", responses=ERRORS)
    def analyst_sql(
        body: AnalystQuery, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError(401, "missing_token", "send Authorization: Bearer <analyst token>")
        try:
            claims = verify(
                keys.ring(), authorization.removeprefix("Bearer ").strip(), region, ("analyst",)
            )
        except TokenError as exc:
            raise token_error(exc) from None
        queries = metrics.ANALYST_QUERIES
        if not analyst_slots.acquire(blocking=False):
            queries.labels(region, "too_many_queries").inc()
            raise ApiError(
                429,
                "too_many_queries",
                f"{settings.analyst_max_concurrent} analyst queries run already; try again soon",
            )
        try:
            result = run_analyst_query(wh, body.sql, analyst_limits)
        except AnalystQueryError as exc:
            queries.labels(region, exc.code).inc()
            raise ApiError(400, exc.code, str(exc)) from None
        finally:
            analyst_slots.release()
        queries.labels(region, "ok").inc()
        log.info("analyst %s ran a query returning %d rows", claims.owner_id, result.num_rows)
        return {"columns": result.column_names, "rows": result_rows(result)}

    return app


def _parse_cursor(cursor: str | None) -> tuple[int, int] | None:
    if cursor is None:
        return None
    try:
        t, seq = cursor.split(".")
        after = int(t), int(seq)
    except ValueError:
        after = None
    if after is None or not (0 <= after[0] < 2**62 and -1 <= after[1] < 2**63):
        raise ApiError(400, "bad_cursor", "cursor must be the `next` value of a previous page")
    return after
