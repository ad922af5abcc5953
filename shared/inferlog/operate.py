"""The operators' commands: ``inferlog topics``, ``replay``, ``redrive``, ``dlq`` and ``rebuild-store``
(this module wires them; inferlog.epoch, recovery, deadletters and rebuild do the work).

Each command connects to what it needs and says in one line on stderr, with a non-zero exit, when it
cannot (an unreachable broker or database, a bad argument): it changes nothing then. A progress bar goes
to stderr while it works; the summary table (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import asyncpg
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress
from rich.table import Column, Table

from inferlog.admission import Admission, Limits
from inferlog.batchfile import LineError, check_namespace, namespace_of, read_lines
from inferlog.config import InferlogSettings
from inferlog.db import connect_pool
from inferlog.deadletters import (
    FAILED_AGAIN,
    NOT_REDRIVABLE,
    REDRIVEN,
    VALUE_PREVIEW_CHARS,
    Dlq,
    Letter,
    LetterFilter,
    Verdict,
    assess,
    iso,
    parse_position,
    preview,
    read_dlq,
    redrive_letters,
)
from inferlog.epoch import EpochMarker, Prepared, inspect_broker, prepare_broker
from inferlog.errors import ConfigError, InferlogError
from inferlog.hot import Keys, Leases, StatusCache
from inferlog.kafka import make_producer
from inferlog.ledger import JobView, OpenCount, RequestLedger, key_of
from inferlog.messages import Priority, Status, now
from inferlog.models import ModelRegistry
from inferlog.publishing import Submitter
from inferlog.rebuild import check_schema, rebuild
from inferlog.recovery import (
    OPEN_STATUSES,
    Progress,
    RedriveReport,
    ReplayFilter,
    ReplayReport,
    check_extension,
    parse_time,
    redrive,
    replay,
)
from inferlog.submitfile import output_line, submit_lines, wait_for
from inferlog.topics import Topics, ensure_topics

PRODUCE_TIMEOUT_S = 30.0


def add_commands(sub: Any) -> None:
    """Add the operators' sub-commands to ``inferlog``'s parser."""
    cmd = sub.add_parser("topics", help="create the topics and the broker's epoch marker; check partition counts",
                         description="Create missing topics, check every partition count, and start a broker "
                         "epoch (a marker on the meta topic, recorded in the ledger) when a topic was created or "
                         "no marker is there. The services wait for it after the broker lost its log.")
    cmd.add_argument("--repair", action="store_true",
                     help="delete and re-create topics whose partition count is wrong (their records are lost; "
                     "`inferlog redrive` brings the open jobs back)")
    cmd.set_defaults(operate="topics")
    cmd = sub.add_parser("redrive", help="after the broker lost its log: every open job back on it, from the ledger",
                         description="Re-publish every accepted job without a terminal result from its ledger "
                         "payload into the broker's current epoch (run `inferlog topics` first). Jobs re-driven "
                         "into this epoch before are skipped; nothing is generated twice.")
    cmd.add_argument("--extend-deadline", type=float, default=None, metavar="S",
                     help="give jobs whose deadline passed a new one, S seconds from now (else they end expired)")
    cmd.add_argument("--dry-run", action="store_true", help="count what would be re-driven; change nothing")
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    cmd.set_defaults(operate="redrive")
    _add_dlq(sub)
    _add_submit(sub)
    cmd = sub.add_parser("rebuild-store", help="rebuild the result store from the log into a fresh schema, and "
                         "compare it with the live one",
                         description="Replay the requests, events and results topics from their start through the "
                         "services' own code into a fresh schema, then compare every job with the live schema "
                         "column by column for what the log carries (status, text, finish reason, usage, model and "
                         "version, tenant, error, timings). Exit status 0: the live store is the log's view; 3: "
                         "differences (listed). The earliest record seen says how much log there was.")
    cmd.add_argument("--into-schema", required=True, metavar="NAME", help="the fresh schema to rebuild into")
    cmd.add_argument("--replace", action="store_true", help="drop NAME first if it holds tables")
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    cmd.set_defaults(operate="rebuild-store")
    cmd = sub.add_parser("replay", help="re-publish the open jobs claimed in a time window (after an outage)",
                         description="Re-publish the jobs claimed in [--since, --until] that have no terminal "
                         "result, from the ledger's payloads (cross-checked against the requests topic). A job "
                         "already done or in progress costs nothing: nothing is generated twice.")
    cmd.add_argument("--since", type=_time, default=None, help="window start: ISO-8601 (UTC if no offset) or Unix s")
    cmd.add_argument("--until", type=_time, default=None, help="window end (default: now)")
    cmd.add_argument("--tenant", default=None, help="only this tenant's jobs ('' for the default tenant)")
    cmd.add_argument("--status", nargs="+", choices=[s.value for s in OPEN_STATUSES], default=None,
                     help="only jobs whose ledger status is one of these (default: every open status)")
    cmd.add_argument("--extend-deadline", type=float, default=None, metavar="S",
                     help="give jobs whose deadline passed a new one, S seconds from now (else they end expired)")
    cmd.add_argument("--dry-run", action="store_true", help="list what would be re-published; change nothing")
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    cmd.set_defaults(operate="replay")


def _add_submit(sub: Any) -> None:
    cmd = sub.add_parser("submit", help="a JSONL file of requests onto the log, resumably (optionally wait and write "
                         "the results)", description="Claim and produce one job per line (an inferlog request record "
                         "or an OpenAI batch line: custom_id, method, url, body), each under the ID "
                         "<namespace>.<custom_id>. Running the same file again submits nothing twice and finishes "
                         "what a stopped run left. Bad lines are reported one by one; the others are served. Exit "
                         "status 0: every line submitted (and, with --wait, finished); 3: some were not.")
    cmd.add_argument("file", type=Path, help="one JSON object a line")
    cmd.add_argument("--namespace", default=None, help="the jobs' ID prefix (default: the file's content hash)")
    cmd.add_argument("--tenant", default=None, help="the tenant the jobs belong to (default: the default tenant)")
    cmd.add_argument("--priority", choices=[p.value for p in Priority], default=None,
                     help="every line's tier (default: an inferlog record's own; OpenAI lines: batch)")
    cmd.add_argument("--rate", type=float, default=None, metavar="R", help="at most R lines a second")
    cmd.add_argument("--wait", action="store_true", help="then wait until every line's job has ended")
    cmd.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="give up waiting (for room in a full "
                     "tier, and with --wait for the jobs) after S seconds")
    cmd.add_argument("--output", type=Path, default=None, help="with --wait: one result line per input line, in "
                     "order (OpenAI's batch output format for OpenAI lines)")
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    cmd.set_defaults(operate="submit")


def _add_dlq(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="the dead-letter queue: list, show and re-drive dead letters",
                         description="Dead letters are records a stage set aside because they could never "
                         "succeed. Once the cause is fixed, `dlq redrive` runs each again as a new job "
                         "(<id>.redrive-<n>, linked both ways): a job's first terminal result is never changed.")
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="{list,show,redrive}")

    def filters(cmd: Any) -> None:
        cmd.add_argument("--stage", choices=STAGES, default=None, help="only dead letters of this stage")
        cmd.add_argument("--reason", default=None, help="only those whose error contains this (any case)")
        cmd.add_argument("--since", type=_time, default=None, help="only those dead-lettered since (ISO-8601 or Unix s)")
        cmd.add_argument("--json", action="store_true", help="print JSON")

    cmd = actions.add_parser("list", help="every dead letter: where it came from, why, and what a re-drive would do")
    filters(cmd)
    cmd = actions.add_parser("show", help="one dead letter in full")
    cmd.add_argument("position", help="its place on the DLQ, <partition>:<offset> as `dlq list` prints it")
    cmd.add_argument("--json", action="store_true", help="print JSON")
    cmd = actions.add_parser("redrive", help="run the matching dead letters again, each as a new job")
    filters(cmd)
    cmd.add_argument("positions", nargs="*", help="only these (<partition>:<offset>); default: every match")
    cmd.add_argument("--extend-deadline", type=float, default=None, metavar="S",
                     help="give a re-driven job whose original deadline passed a new one, S seconds from now")
    cmd.add_argument("--dry-run", action="store_true", help="say what would be re-driven; change nothing")
    dlq.set_defaults(operate="dlq")


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_command(args: argparse.Namespace, settings: InferlogSettings) -> int:
    # The client libraries log each failed connection attempt: the command's own one line says it.
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        return asyncio.run(_COMMANDS[args.operate](args, settings))
    except InferlogError as exc:
        return _fail(args, str(exc))
    except (KafkaError, OSError, TimeoutError) as exc:
        return _fail(args, f"the broker at {settings.kafka_bootstrap} did not answer: {str(exc) or type(exc).__name__}")
    except asyncpg.PostgresError as exc:  # one that is not an outage (a deadlock, a missing table)
        return _fail(args, f"Postgres refused: {str(exc) or type(exc).__name__}")


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"inferlog {args.operate}: {message}", file=sys.stderr)
    return 1


@dataclass
class _Connections:
    ledger: RequestLedger
    submitter: Submitter
    topics: Topics


@asynccontextmanager
async def _connected(settings: InferlogSettings) -> AsyncIterator[_Connections]:
    """The ledger and a producer, or one clear error: the ledger must exist in the schema and every topic
    on the broker with its configured partitions (a metadata request for a missing one would create it)."""
    topics = Topics.from_settings(settings)
    pool = await connect_pool(settings.postgres_url, settings.postgres_schema, max_size=4)
    try:
        if await pool.fetchval("SELECT to_regclass('requests')") is None:
            raise ConfigError(f"schema {settings.postgres_schema} holds no ledger: run `inferlog migrate`")
        await ensure_topics(settings.kafka_bootstrap, topics, create=False)
        producer = make_producer(settings.kafka_bootstrap)
        await producer.start()
        try:
            ledger = RequestLedger(pool)
            yield _Connections(ledger, Submitter(ledger, producer, topics, PRODUCE_TIMEOUT_S), topics)
        finally:
            await producer.stop()
    finally:
        await pool.close()


class _Bar:
    """rich's progress bar on stderr, one task per phase (shown only on a terminal)."""

    def __init__(self) -> None:
        console = Console(stderr=True)
        self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  console=console, transient=True, disable=not console.is_terminal)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, phase: str, advance: int, total: int | None) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total)
        self._progress.update(self._tasks[phase], advance=advance, total=total)


async def _replay(args: argparse.Namespace, settings: InferlogSettings) -> int:
    selected = ReplayFilter(since=args.since, until=args.until, tenant=args.tenant,
                            statuses=tuple(Status(s) for s in args.status) if args.status else OPEN_STATUSES,
                            extend_deadline_s=args.extend_deadline)
    async with _connected(settings) as c:
        with _Bar() as bar:
            report = await replay(c.ledger, c.submitter, settings.kafka_bootstrap, c.topics.requests, selected,
                                  dry_run=args.dry_run, progress=bar)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_replay(report)
    return 0


def _print_replay(report: ReplayReport) -> None:
    console = Console(markup=False, emoji=False)  # job keys are the clients' text: printed as they are
    if report.dry_run and report.republished:
        listing = Table(Column("job", overflow="fold"), "why", title="would re-publish", title_justify="left")
        passed, gone = set(report.deadline_passed), set(report.not_on_log)
        recovered = set(report.recovered_from_log)
        for key in report.republished:
            why = ", ".join(w for w, on in (("from the log", key in recovered), ("not on the log", key in gone),
                                            ("deadline passed", key in passed)) if on) or "open"
            listing.add_row(key, why)
        console.print(listing)
    for key in report.missing_payload:
        console.print(f"missing payload (open, nothing to re-publish from): {key}")
    summary = Table("jobs", "count", title="replay" + (" (dry run: nothing changed)" if report.dry_run else ""),
                    title_justify="left")
    for label, count in report.counts().items():
        summary.add_row(label, str(count))
    console.print(summary)
    earliest = "nothing" if report.earliest_on_log is None else f"{report.earliest_on_log:.3f}"
    console.print(f"requests topic: {report.log_records} records in the window; earliest seen {earliest}")


async def _topics(args: argparse.Namespace, settings: InferlogSettings) -> int:
    topics = Topics.from_settings(settings)
    pool = await connect_pool(settings.postgres_url, settings.postgres_schema, max_size=1)
    try:  # checked before the broker is touched: a marker the ledger cannot record would be half an epoch
        if await pool.fetchval("SELECT to_regclass('broker_epochs')") is None:
            raise ConfigError(f"schema {settings.postgres_schema} holds no ledger: run `inferlog migrate`")
    finally:
        await pool.close()
    prepared = await prepare_broker(settings.kafka_bootstrap, topics, repair=args.repair)
    await record_epoch(settings, prepared)
    for name, count in topics.layout().items():
        done = " (created)" if name in prepared.created else " (re-created)" if name in prepared.repaired else ""
        print(f"{name}: {count} partitions{done}")
    marker = prepared.marker
    print(f"broker epoch {marker.epoch}" + (" (new: the broker's log starts here; `inferlog redrive` brings "
                                            "back the open jobs of an earlier one)" if prepared.new_epoch else ""))
    return 0


async def record_epoch(settings: InferlogSettings, prepared: Prepared) -> None:
    """The ledger's row of the broker's epoch."""
    pool = await connect_pool(settings.postgres_url, settings.postgres_schema, max_size=1)
    try:
        marker = prepared.marker
        await RequestLedger(pool).record_epoch(marker.epoch, settings.kafka_bootstrap, marker.layout,
                                               marker.written_at)
    finally:
        await pool.close()


async def _redrive(args: argparse.Namespace, settings: InferlogSettings) -> int:
    check_extension(args.extend_deadline)
    async with _connected(settings) as c:
        state = await inspect_broker(settings.kafka_bootstrap, c.topics)
        if not state.sound or state.marker is None:
            raise ConfigError(f"the broker is not ready for a re-drive ({'; '.join(state.problems)}): "
                              "run `inferlog topics` first")
        if not args.dry_run:
            await _let_guards_notice(settings, state.marker, sys.stderr)
        with _Bar() as bar:
            report = await redrive_into(settings, c, state.marker, extend_deadline_s=args.extend_deadline,
                                        dry_run=args.dry_run, progress=bar)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    console = Console(markup=False, emoji=False)
    for key in report.missing_payload:
        console.print(f"missing payload (open, nothing to re-drive from): {key}")
    summary = Table("jobs", "count", title="redrive" + (" (dry run: nothing changed)" if report.dry_run else ""),
                    title_justify="left")
    for label, count in report.counts().items():
        summary.add_row(label, str(count))
    console.print(summary)
    console.print(f"into broker epoch {report.epoch}")
    return 0


async def _let_guards_notice(settings: InferlogSettings, marker: EpochMarker, say: TextIO) -> None:
    """A service still on the old log could commit an old offset past records re-driven before it exits:
    give every guard its two checks after the marker was written (nothing to wait for once they are past,
    whoever wrote it: an ``up`` stopped mid-wait and run again waits out the rest)."""
    wait_s = marker.written_at + 2 * settings.broker_check_interval_s + 2 - now()
    if wait_s > 0:
        print(f"waiting {wait_s:.0f}s for running services to notice the new broker epoch", file=say, flush=True)
        await asyncio.sleep(wait_s)


async def redrive_into(settings: InferlogSettings, c: _Connections, marker: EpochMarker, *,
                       extend_deadline_s: float | None = None, dry_run: bool = False,
                       progress: Progress | None = None) -> RedriveReport:
    """``redrive`` into the marker's epoch, one run at a time; then the re-driven jobs' done leases go (a
    result they vouch for was on the lost log: a watcher would wait out their hour-long TTL)."""
    async with c.ledger.exclusive("redrive"):
        report = await redrive(c.ledger, c.submitter, marker.epoch, marker.written_at,
                               extend_deadline_s=extend_deadline_s, dry_run=dry_run, progress=progress)
    if not dry_run and report.redriven:
        redis = Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            await Leases(redis, Keys(settings.redis_prefix), holder="operator", ttl_ms=1).forget_recorded(
                report.redriven)
        except (RedisError, OSError) as exc:
            print(f"inferlog redrive: done leases not cleared (Redis: {exc}); a job whose result was on the lost "
                  "log waits for its lease to expire (an hour)", file=sys.stderr)
        finally:
            await redis.aclose()
    return report


async def recover_on_up(settings: InferlogSettings, prepared: Prepared, *, others_may_consume: bool) -> RedriveReport:
    """``inferlog up``'s recovery before it serves: ``redrive`` into the epoch it just prepared (a run that
    finds nothing to do publishes nothing). ``others_may_consume``: the broker was found, not started, so
    services of another stack may still consume the old log; they get their guards' two checks first."""
    async with _connected(settings) as c:
        if others_may_consume:
            await _let_guards_notice(settings, prepared.marker, sys.stdout)
        with _Bar() as bar:
            return await redrive_into(settings, c, prepared.marker, progress=bar)


async def count_open(settings: InferlogSettings) -> OpenCount:
    """The ledger's accepted jobs without a terminal result (``RequestLedger.open_count``)."""
    pool = await connect_pool(settings.postgres_url, settings.postgres_schema, max_size=1)
    try:
        return await RequestLedger(pool).open_count()
    finally:
        await pool.close()


STAGES = ("tokenizer", "gpu-worker", "result-store")


async def _dlq(args: argparse.Namespace, settings: InferlogSettings) -> int:
    if args.dlq_action == "redrive":
        check_extension(args.extend_deadline)
    wanted = {parse_position(p) for p in getattr(args, "positions", None) or ()}
    shown = parse_position(args.position) if args.dlq_action == "show" else None
    async with _connected(settings) as c:
        with _Bar() as bar:
            dlq = await read_dlq(settings.kafka_bootstrap, c.topics.dlq, progress=bar)
            if shown is not None:
                letter = dlq.find(*shown)
                if letter is None:
                    raise ConfigError(f"no dead letter at {args.position} (the DLQ holds {dlq.records} records)")
                letters = dlq.letters  # judged with the others: a dead letter of a job another one re-drives
            else:
                chosen = LetterFilter(args.stage, args.reason, args.since)
                letters = [lt for lt in dlq.letters if chosen.matches(lt) and (not wanted or _places(lt) & wanted)]
                missing = wanted - set().union(*(_places(lt) for lt in letters))
                if missing:
                    raise ConfigError("no dead letter matching the filters at " +
                                      ", ".join(f"{p}:{o}" for p, o in sorted(missing)))
            verdicts = await assess(c.ledger, settings.kafka_bootstrap, c.topics, letters)
            if args.dlq_action == "show":
                return await _show_letter(args, c.ledger, next(v for v in verdicts if v.letter is letter))
            if args.dlq_action == "list":
                _print_letters(args, dlq, verdicts)
                return 0
            report = await redrive_letters(c.ledger, c.submitter, verdicts, extend_deadline_s=args.extend_deadline,
                                           dry_run=args.dry_run, progress=bar)
        if not args.dry_run:
            await _refresh_hot(settings, c.ledger, sorted({o for _p, o, _n in report.redriven}))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    console = Console(markup=False, emoji=False)
    if report.redriven:
        listing = Table("dead letter", Column("job", overflow="fold"), Column("re-driven as", overflow="fold"),
                        title="would re-drive" if report.dry_run else "re-driven", title_justify="left")
        for position, original, new in report.redriven:
            listing.add_row(position, original, new)
        console.print(listing)
    for position, why in report.not_redrivable:
        console.print(f"not re-drivable: {position}: {why}")
    for position, original in report.failed_again:
        console.print(f"failed again: {position} is a dead letter of a re-drive of {original}; not re-driven "
                      "again (submit the job anew once its cause is fixed)")
    summary = Table("dead letters", "count", title="dlq redrive" + (" (dry run: nothing changed)" if report.dry_run
                                                                    else ""), title_justify="left")
    for label, count in report.counts().items():
        summary.add_row(label, str(count))
    console.print(summary)
    return 0


def _places(letter: Letter) -> set[tuple[int, int]]:
    """Every DLQ position of a dead letter: its first copy's and the later copies'."""
    return {(letter.partition, letter.offset), *letter.copies_at}


def _print_letters(args: argparse.Namespace, dlq: Dlq, verdicts: list[Verdict]) -> None:
    if args.json:
        print(json.dumps({"records": dlq.records, "unreadable": dlq.unreadable,
                          "dead_letters": [{**v.to_json(), "value": preview(v.letter.dead.value, 200)}
                                           for v in verdicts]}, indent=2))
        return
    console = Console(markup=False, emoji=False, soft_wrap=True)  # one dead letter a block, at any width
    console.print(f"{len(verdicts)} dead letters ({dlq.records} records on the DLQ)")
    for v in verdicts:
        dead = v.letter.dead
        copies = f" ({v.letter.copies} copies)" if v.letter.copies > 1 else ""
        console.print(f"{v.letter.position}{copies}  {iso(dead.at)}  {dead.stage}  job {dead.request_id or '-'}  "
                      f"[{_state(v)}]")
        console.print(f"    reason: {preview(dead.error, 160)}")
        console.print(f"    source: {dead.topic}[{dead.partition}]@{dead.offset}  value: {preview(dead.value, 80)}"
                      + (f" ({dead.value_bytes} bytes, truncated)" if dead.truncated else ""))
    for position in dlq.unreadable:
        console.print(f"unreadable DLQ record at {position} (not a dead letter)")


def _state(v: Verdict) -> str:
    if v.state == REDRIVEN:
        return f"re-driven as {v.detail}"
    if v.state == FAILED_AGAIN:
        return f"failed again (a re-drive of {v.detail})"
    if v.state == NOT_REDRIVABLE:
        return f"not re-drivable: {v.detail}"
    if v.same_as is not None:
        return f"re-drivable with {v.same_as.position} (the same job and payload: one re-drive)"
    return "re-drivable"


async def _show_letter(args: argparse.Namespace, ledger: RequestLedger, v: Verdict) -> int:
    dead = v.letter.dead
    key = v.original_key
    job = await ledger.get(key) if key and "\x00" not in key else None  # NUL: no job's key (and no query's)
    linked = {"redrive_of": job.redrive_of, "redriven_as": list(job.redriven_as)} if job else {}
    if args.json:
        print(json.dumps({**v.to_json(), "value": dead.value, "job": key,
                          "job_status": job.status.value if job else None, **linked}, indent=2))
        return 0
    console = Console(markup=False, emoji=False, soft_wrap=True)
    rows = [("dead letter", f"{v.letter.position}" + (f" ({v.letter.copies} copies)" if v.letter.copies > 1 else "")),
            ("at", iso(dead.at)), ("stage", dead.stage), ("error", dead.error),
            ("source", f"{dead.topic}[{dead.partition}]@{dead.offset}"), ("job", key or "-"),
            ("job status", job.status.value if job else "no ledger row"),
            ("value", f"{dead.value_bytes} bytes, sha256 {dead.value_sha256}" + (", truncated" if dead.truncated
                                                                                 else "")),
            ("re-drive", _state(v))]
    if job and job.redriven_as:
        rows.append(("job re-driven as", ", ".join(job.redriven_as)))
    if job and job.redrive_of:
        rows.append(("job is a re-drive of", job.redrive_of))
    for label, value in rows:
        console.print(f"{label + ':':<22}{value}")
    console.print(f"{'value (start):':<22}{preview(dead.value, VALUE_PREVIEW_CHARS)}")
    return 0


async def _refresh_hot(settings: InferlogSettings, ledger: RequestLedger, keys: list[str]) -> None:
    """The re-driven originals' hot views (a poll answers a terminal one from Redis): with their link now.
    Best effort: a failure is said; the views expire in time, and Postgres answers polls without Redis."""
    if not keys:
        return
    redis = Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        views = [v for v in await ledger.get_many(keys) if v.status.is_terminal()]
        await StatusCache(redis, Keys(settings.redis_prefix)).put_many([v.to_hot() for v in views])
    except InferlogError as exc:  # the re-drive is done: say so, and still print its report
        print(f"inferlog dlq: the originals' cached status was not refreshed (Postgres: {exc}); their polls show "
              "the link once it expires", file=sys.stderr)
    except (RedisError, OSError) as exc:
        print(f"inferlog dlq: the originals' cached status was not refreshed (Redis: {exc}); their polls show "
              "the link once it expires", file=sys.stderr)
    finally:
        await redis.aclose()


REBUILD_DIFFERS_EXIT = 3


async def _rebuild_store(args: argparse.Namespace, settings: InferlogSettings) -> int:
    check_schema(args.into_schema, settings.postgres_schema)
    topics = Topics.from_settings(settings)
    await ensure_topics(settings.kafka_bootstrap, topics, create=False)
    with _Bar() as bar:
        report = await rebuild(settings.postgres_url, settings.postgres_schema, args.into_schema,
                               settings.kafka_bootstrap, topics, replace=args.replace, progress=bar)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.consistent else REBUILD_DIFFERS_EXIT
    console = Console(markup=False, emoji=False)
    seen = Table("topic", "records", "unreadable", "earliest record", title="the log", title_justify="left")
    for name, topic in report.topics.items():
        seen.add_row(name, str(topic.records), str(topic.unreadable),
                     "-" if topic.earliest_ms is None else iso(topic.earliest_ms / 1000))
    console.print(seen)
    if report.differences:
        diffs = Table(Column("job", overflow="fold"), "column", Column("live", overflow="fold"),
                      Column("rebuilt", overflow="fold"), title="differences", title_justify="left")
        for key, column, live, rebuilt in report.differences:
            diffs.add_row(key, column, preview(json.dumps(live), 200), preview(json.dumps(rebuilt), 200))
        console.print(diffs)
    for key, why in report.rejected:
        console.print(f"refused by the store (dead-lettered live too): {key}: {why}")
    summary = Table("jobs", "count", title=f"rebuilt into schema {report.schema}", title_justify="left")
    for label, count in (("rebuilt from the log", report.rebuilt_jobs), ("identical to the live store", report.identical),
                         ("with differences", len({k for k, *_ in report.differences})),
                         ("only in the live store", len(report.only_live)),
                         ("  of them never published (no log holds them)", report.only_live_unpublished),
                         ("only in the rebuild", len(report.only_rebuilt))):
        summary.add_row(label, str(count))
    console.print(summary)
    console.print("the live store is the log's view" if report.consistent else
                  "the live store and the log differ (above); a log that starts late (a lost broker log, "
                  "retention) explains jobs only in the live store")
    return 0 if report.consistent else REBUILD_DIFFERS_EXIT


async def _submit(args: argparse.Namespace, settings: InferlogSettings) -> int:
    if args.output is not None and not args.wait:
        raise ConfigError("--output needs --wait (the results are written once the jobs have ended)")
    for name, value in (("--rate", args.rate), ("--timeout", args.timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number of seconds or lines, not {value}")
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    if args.output is not None:  # found now, not after the wait
        try:
            args.output.open("a").close()
        except OSError as exc:
            raise ConfigError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    namespace = check_namespace(args.namespace) if args.namespace is not None else namespace_of(data)
    lines = read_lines(data, namespace=namespace, known_models=[m.name for m in ModelRegistry(settings)],
                       default_model=settings.default_model, tenant=args.tenant or None,
                       priority=Priority(args.priority) if args.priority else None, received_at=now())
    views: dict[str, JobView] = {}
    async with _connected(settings) as c:
        with _Bar() as bar:
            admission = Admission(c.ledger, Limits.from_settings(settings))
            report = await submit_lines(c.submitter, lines, rate=args.rate, admission=admission,
                                        room_timeout_s=args.timeout, progress=bar)
            refused = {number: LineError(code, message) for number, code, message in report.errors}
            jobs = [key_of(ln.record) for ln in lines if ln.record is not None and ln.number not in refused]
            if args.wait:
                views = await wait_for(c.ledger, jobs, timeout_s=args.timeout, progress=bar)
                report.outcomes = dict(Counter(views[k].status.value if k in views and views[k].status.is_terminal()
                                               else "unfinished" for k in jobs))
    if args.output is not None:
        with args.output.open("w") as out:
            for line in lines:
                if line.number in refused:
                    line = dataclasses.replace(line, record=None, error=refused[line.number])
                view = views.get(key_of(line.record)) if line.record is not None else None
                out.write(json.dumps(output_line(line, view)) + "\n")
    if args.json:
        print(json.dumps({"namespace": namespace, **report.to_json()}, indent=2))
    else:
        console = Console(markup=False, emoji=False, soft_wrap=True)
        for number, code, message in report.errors[:20]:
            console.print(f"line {number}: {code}: {message}")
        if len(report.errors) > 20:
            console.print(f"… and {len(report.errors) - 20} more lines with errors (--json lists them all)")
        summary = Table("lines", "count", title=f"submit {args.file} (namespace {namespace})", title_justify="left")
        for label, count in report.counts().items():
            summary.add_row(label, str(count))
        console.print(summary)
    unfinished = report.outcomes.get("unfinished", 0) if args.wait else 0
    return 3 if report.errors or unfinished else 0


_COMMANDS = {"submit": _submit, "replay": _replay, "redrive": _redrive, "topics": _topics, "dlq": _dlq, "rebuild-store": _rebuild_store}
