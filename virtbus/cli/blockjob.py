"""Block job verbs under virsh's names and flags: blockcommit, blockpull, blockcopy,
blockjob, domblkerror. ``--wait`` / ``--pivot`` wait here, reading the job's progress as virsh does
(``--verbose`` prints it); ``--pivot`` then finishes the ready active commit."""

from __future__ import annotations

import argparse
import asyncio
import sys

from virtbus.cli.context import Context
from virtbus.cli.output import emit_json, fields
from virtbus.client import Domain
from virtbus.errors import InvalidArgument, OperationFailed
from virtbus.protocol.base import to_wire
from virtbus.protocol.blockjob import BlockJobInfo

POLL_S = 0.5  # virsh reads a waited job's progress twice a second too
_TYPES = {
    "commit": "Block Commit",
    "active-commit": "Active Block Commit",
    "pull": "Block Pull",
    "copy": "Block Copy",
}


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or uuid")
    p.add_argument("path", help="the disk's target (vda)")
    p.add_argument("--host", help="host the domain is on (default: found on the bus)")


def _waits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bandwidth", type=int, default=0, help="MiB/s (0: unlimited)")
    p.add_argument("--wait", action="store_true", help="return once the job ended (or is ready)")
    p.add_argument("--verbose", action="store_true", help="print the progress while waiting")
    p.add_argument("--timeout", dest="wait_timeout", type=float, help="abort after S seconds")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("blockcommit", help="merge a disk's image chain down into a base image")
    _target(p)
    p.add_argument("--base", help="the image to commit into (default: the chain's bottom)")
    p.add_argument("--top", help="the top image to commit (default: the active layer)")
    p.add_argument("--shallow", action="store_true", help="base: the image right below top")
    p.add_argument("--active", action="store_true", help="commit the active layer")
    p.add_argument("--pivot", action="store_true", help="then run the disk on the base")
    p.add_argument("--keep-overlay", action="store_true",
                   help="then stay on the active layer (abort once ready)")  # fmt: skip
    _waits(p)
    p.set_defaults(func=blockcommit)
    p = sub.add_parser("blockpull", help="copy a disk's backing chain into its active layer")
    _target(p)
    p.add_argument("--base", help="keep this image and below (default: pull everything)")
    _waits(p)
    p.set_defaults(func=blockpull)
    p = sub.add_parser("blockcopy", help="mirror a disk onto a new image")
    _target(p)
    p.add_argument("dest", help="the new image (must not exist)")
    p.add_argument("--format", choices=("qcow2", "raw"), default="qcow2", help="its format")
    p.add_argument("--shallow", action="store_true", help="(refused: not supported yet)")
    p.add_argument("--pivot", action="store_true", help="then run the disk on the copy")
    p.add_argument("--finish", action="store_true", help="then end it, the copy kept")
    _waits(p)
    p.set_defaults(func=blockcopy)
    p = sub.add_parser("blockjob", help="a disk's block job: info, abort, pivot, bandwidth")
    _target(p)
    p.add_argument("--info", action="store_true", help="the job's progress (default)")
    p.add_argument("--abort", action="store_true", help="cancel the job")
    p.add_argument("--pivot", action="store_true", help="finish a ready active commit")
    p.add_argument("--bandwidth", type=int, help="set the job's MiB/s (0: unlimited)")
    p.add_argument("--async", dest="async_", action="store_true", help="(accepted)")
    p.set_defaults(func=blockjob)
    p = sub.add_parser("domblkerror", help="the disks that saw an I/O error")
    p.add_argument("domain", help="domain name or uuid")
    p.add_argument("--host", help="host the domain is on (default: found on the bus)")
    p.set_defaults(func=domblkerror)


def _progress(info: BlockJobInfo) -> str:
    pct = 100 * info.cur // info.end if info.end else (100 if info.ready else 0)
    return f"{_TYPES.get(info.type, info.type)}: [{pct:3d} %]"


async def _wait(dom: Domain, disk: str, args: argparse.Namespace, ready_ok: bool) -> bool:
    """Wait until the job ended (True) or, with ``ready_ok``, is ready (False)."""
    loop = asyncio.get_running_loop()
    deadline = None if args.wait_timeout is None else loop.time() + args.wait_timeout
    while True:
        state = await dom.block_job_state(disk)
        info = state.job
        if info is None:
            if state.last is not None and state.last.status == "failed":
                raise OperationFailed(f"block job of disk '{disk}' failed: {state.last.error}")
            return True
        if args.verbose:
            sys.stdout.write(f"\r{_progress(info)}")
            sys.stdout.flush()
        if ready_ok and info.ready:
            return False
        if deadline is not None and loop.time() > deadline:
            await dom.block_job_abort(disk)
            raise OperationFailed(f"block job of disk '{disk}' aborted after the --timeout")
        await asyncio.sleep(POLL_S)


async def blockcommit(ctx: Context, args: argparse.Namespace) -> int:
    if args.pivot and args.keep_overlay:
        raise InvalidArgument("--pivot and --keep-overlay are mutually exclusive")
    if (args.pivot or args.keep_overlay) and not args.active:
        raise InvalidArgument("--pivot and --keep-overlay need --active")
    dom = await ctx.domain(args.host, args.domain)
    info = await dom.block_commit(args.path, base=args.base, top=args.top, active=args.active,
                                  shallow=args.shallow, bandwidth=args.bandwidth)  # fmt: skip
    if args.pivot or args.keep_overlay or args.wait:
        ended = await _wait(dom, args.path, args, ready_ok=args.active)
        if not ended and (args.pivot or args.keep_overlay):
            await dom.block_job_abort(args.path, pivot=args.pivot)
        if args.verbose:
            print()
        if ctx.json:
            emit_json({"disk": args.path, "pivoted": args.pivot, "ended": True})
        elif args.pivot:
            print("Successfully pivoted")
        elif args.keep_overlay or ended:
            print("Commit complete")
        else:
            print("Now in synchronized phase")
        return 0
    if ctx.json:
        emit_json(to_wire(info))
    else:
        print("Block Commit started")
    return 0


async def blockcopy(ctx: Context, args: argparse.Namespace) -> int:
    if args.pivot and args.finish:
        raise InvalidArgument("--pivot and --finish are mutually exclusive")
    dom = await ctx.domain(args.host, args.domain)
    info = await dom.block_copy(args.path, args.dest, format=args.format, shallow=args.shallow,
                                bandwidth=args.bandwidth)  # fmt: skip
    if args.pivot or args.finish or args.wait:
        ended = await _wait(dom, args.path, args, ready_ok=True)
        if args.verbose:
            print()
        if ended:
            raise OperationFailed(f"block copy of disk '{args.path}' ended before it was ready")
        if args.pivot or args.finish:
            await dom.block_job_abort(args.path, pivot=args.pivot)
        print("Successfully pivoted" if args.pivot else "Successfully copied" if args.finish
              else "Now in mirroring phase")  # fmt: skip
        return 0
    if ctx.json:
        emit_json(to_wire(info))
    else:
        print("Block Copy started")
    return 0


async def blockpull(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    info = await dom.block_pull(args.path, base=args.base, bandwidth=args.bandwidth)
    if args.wait:
        await _wait(dom, args.path, args, ready_ok=False)
        if args.verbose:
            print()
        print("Pull complete")
        return 0
    if ctx.json:
        emit_json(to_wire(info))
    else:
        print("Block Pull started")
    return 0


async def blockjob(ctx: Context, args: argparse.Namespace) -> int:
    chosen = [f for f in ("abort", "pivot") if getattr(args, f)]
    if len(chosen) > 1 or (chosen and args.bandwidth is not None):
        raise InvalidArgument("give one of --info, --abort, --pivot, --bandwidth")
    dom = await ctx.domain(args.host, args.domain)
    if chosen:
        await dom.block_job_abort(args.path, pivot=args.pivot)
        return 0
    if args.bandwidth is not None:
        await dom.block_job_speed(args.path, args.bandwidth)
        return 0
    info = await dom.block_job(args.path)
    if ctx.json:
        emit_json(to_wire(info) if info is not None else None)
    elif info is None:
        print(f"No current block job for {args.path}")
    else:
        print(f"{_progress(info)}")
        if info.bandwidth:
            print(fields([("Bandwidth limit", f"{info.bandwidth} MiB/s")]))
    return 0


async def domblkerror(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    errors = await dom.block_errors()
    if ctx.json:
        emit_json([to_wire(e) for e in errors])
    elif not errors:
        print("No errors found")
    else:
        for e in errors:
            print(f"{e.disk}: {e.error}")
    return 0
