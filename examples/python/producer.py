#!/usr/bin/env python3
"""A redtx producer in Python: a 2PC transfer and a saga, each waited for without polling.

Written from docs/protocol.md alone, with redis-py and msgpack. It moves 10 from acct:alice at
participant bank-a to acct:bob at bank-b (2PC, the debit guarded by min 0), then runs a
two-step saga that pays invoice:<id> (5 from alice at bank-a, then 5 to bob at bank-b, each
with its compensation). Exit status: 0 both committed/completed, 1 an outcome other than that,
2 no answer in time or the deployment is not ready (protocol version, missing participants).
"""

import argparse
import os
import sys
import time
import uuid
import zlib

import msgpack
import redis

PROTOCOL_VERSION = 2
SETTLED = {"committed", "completed", "aborted", "aborting", "compensated", "stuck", "rejected"}


def partition(txn_id, partitions):
    """P = crc32(id) % N, CRC-32/IEEE of the id's UTF-8 bytes."""
    return zlib.crc32(txn_id.encode()) % partitions


def ops(*items):
    """A key-value participant's payload: the MessagePack array of its op maps (bin)."""
    return msgpack.packb(list(items))


def text(b):
    return b.decode() if isinstance(b, bytes) else b


class Producer:
    def __init__(self, r, partitions):
        self.r = r
        self.partitions = partitions

    def protocol_problem(self):
        """Why this producer cannot talk to the coordinators, if it cannot: they publish the
        version they speak in rtx:protocol (absent if none ever started)."""
        v = self.r.get("rtx:protocol")
        if v is None:
            return "no coordinator has ever started on this Redis (rtx:protocol is not set)"
        if int(v) != PROTOCOL_VERSION:
            return f"the coordinators speak protocol {int(v)}; this producer speaks {PROTOCOL_VERSION}"
        return None

    def missing_participants(self, spec):
        """Participants that never read partition P: no consumer group of their name there."""
        p = partition(spec["id"], self.partitions)
        missing = []
        for b in spec["branches"]:
            name = b["participant"]
            try:
                groups = self.r.xinfo_groups(f"rtx:part:{name}:{{{p}}}")
            except redis.ResponseError:  # no such key: nobody ever read it
                groups = []
            if not any(text(g["name"]) == name for g in groups):
                missing.append(name)
        return missing

    def submit_and_wait(self, spec, timeout):
        """Submits `spec` and waits for it to settle; returns its record (a dict) or None."""
        txn_id = spec["id"]
        p = partition(txn_id, self.partitions)
        outcomes = f"rtx:outcomes:{{{p}}}"
        record = f"rtx:txn:{{{p}}}:{txn_id}"
        # Where the outcomes stream ends now: every outcome of this submit comes after it.
        newest = self.r.xrevrange(outcomes, "+", "-", count=1)
        last_id = newest[0][0] if newest else b"0-0"
        m = {"v": PROTOCOL_VERSION, "spec": spec, "submitted_ms": int(time.time() * 1000)}
        self.r.xadd(f"rtx:coord:{{{p}}}", {"t": "submit", "m": msgpack.packb(m)})
        deadline = time.monotonic() + timeout
        # The record is the truth: read it after the XADD (an id that settled before gets no new
        # outcome) and after every empty wait; the outcomes stream only wakes us up.
        settled = text(self.r.hget(record, "state")) in SETTLED
        while not settled:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            reply = self.r.xread({outcomes: last_id}, block=max(1, int(min(left, 1.0) * 1000)))
            if not reply:
                settled = text(self.r.hget(record, "state")) in SETTLED
                continue
            for entry_id, fields in reply[0][1]:
                last_id = entry_id
                settled = settled or text(fields.get(b"id")) == txn_id
        return self.r.hgetall(record)


def transfer_spec(amount):
    return {
        "id": f"py-transfer-{uuid.uuid4().hex[:12]}",
        "mode": "2pc",
        "timeout_ms": 5000,
        "branches": [
            {"participant": "bank-a", "payload": ops({"op": "incrby", "key": "acct:alice", "by": -amount, "min": 0})},
            {"participant": "bank-b", "payload": ops({"op": "incrby", "key": "acct:bob", "by": amount})},
        ],
    }


def saga_spec(amount):
    txn_id = f"py-saga-{uuid.uuid4().hex[:12]}"
    invoice = f"invoice:{txn_id}"
    return {
        "id": txn_id,
        "mode": "saga",
        "timeout_ms": 30000,
        "retry": {"limit": 3, "step_timeout_ms": 2000},
        "branches": [
            {
                "participant": "bank-a",
                "payload": ops({"op": "incrby", "key": "acct:alice", "by": -amount, "min": 0}),
                "compensation": ops({"op": "incrby", "key": "acct:alice", "by": amount}),
            },
            {
                "participant": "bank-b",
                "payload": ops(
                    {"op": "incrby", "key": "acct:bob", "by": amount},
                    {"op": "hset", "key": invoice, "field": "status", "value": "paid"},
                ),
                "compensation": ops(
                    {"op": "incrby", "key": "acct:bob", "by": -amount},
                    {"op": "hset", "key": invoice, "field": "status", "value": "refunded"},
                ),
            },
        ],
    }


def report(name, spec, rec, took, partitions):
    """Prints the outcome; returns the state ('' when there is no record)."""
    what = "branch" if spec["mode"] == "2pc" else "step"
    p = partition(spec["id"], partitions)
    print(f"{name} ({spec['mode']}) {spec['id']}  [partition {p} of {partitions}]")
    if rec is None:
        print(f"  state:  no outcome within {took:.1f}s (the transaction goes on; submitting it again is safe)")
        return ""
    state = text(rec.get(b"state"))
    print(f"  state:  {state}  after {took * 1000:.0f} ms")
    print(f"  reason: {text(rec.get(b'reason')) or '-'}")
    stored = msgpack.unpackb(rec[b"spec"]) if b"spec" in rec else {"branches": []}
    st = msgpack.unpackb(rec[b"st"]) if b"st" in rec else {"branches": []}
    for i, (b, s) in enumerate(zip(stored["branches"], st["branches"])):
        why = f": {s['reason']}" if s.get("reason") else ""
        print(f"  {what} {i} {b['participant']}: {s['phase']}{why}")
    return state


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=os.environ.get("REDTX_REDIS_URL", "redis://127.0.0.1:6379"),
                    help="the Redis holding the streams (default: $REDTX_REDIS_URL or redis://127.0.0.1:6379)")
    ap.add_argument("--partitions", type=int, default=8, help="the deployment's partition count (default 8)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each outcome (default 60)")
    args = ap.parse_args()

    producer = Producer(redis.Redis.from_url(args.redis), args.partitions)
    try:
        return run(producer, args)
    except redis.RedisError as e:
        print(f"error: Redis: {e}", file=sys.stderr)
        return 2


def run(producer, args):
    problem = producer.protocol_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    runs = [("transfer", transfer_spec(10), "committed"), ("saga", saga_spec(5), "completed")]
    # The coordinator does not refuse a participant nobody runs (the transaction would abort at
    # its deadline, or the saga end stuck): check first.
    for _, spec, _ in runs:
        missing = producer.missing_participants(spec)
        if missing:
            print(f"error: no worker of {', '.join(missing)} ever read partition "
                  f"{partition(spec['id'], args.partitions)} of {args.partitions}: start them first", file=sys.stderr)
            return 2
    status = 0
    for name, spec, expected in runs:
        started = time.monotonic()
        rec = producer.submit_and_wait(spec, args.timeout)
        state = report(name, spec, rec, time.monotonic() - started, args.partitions)
        if rec is None:
            status = 2
        elif state != expected:
            print(f"  expected {expected}")
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
