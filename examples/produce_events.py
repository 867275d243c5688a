"""Publish playback events straight to freshrec's event log, as any producer may.

    python examples/produce_events.py --log-urls nats://127.0.0.1:4222 --user alice \\
        --item 50 --item 172

The format (what a producer in any language does):
- partition = FNV-1a 32-bit hash of the user_id's UTF-8 bytes, mod the log's partition
  count (16 unless the log was created with another; the EVENTS stream's description
  says it), e.g. "u1" -> 3, "u2" -> 6, "alice" -> 7 with 16 partitions;
- subject ``freshrec.events.<partition>`` of the stream ``FRESHREC_EVENTS``;
- payload: a serialized ``recsys.v1.PlaybackEvent`` (protos/recsys/v1/events.proto),
  with ``occurred_at`` set;
- header ``Nats-Msg-Id: <event_id>``: a resend within the stream's duplicate window is
  dropped by the server (the ack says duplicate); a later one by the worker.
An event the workers refuse (malformed, invalid, or on another user's partition) is kept
in the shard's rejected events with its reason and changes nothing.

It needs only nats-py and the generated stubs; the hash is written out here on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import nats

from recsys.v1 import events_pb2


def partition(user_id: str, partitions: int) -> int:
    h = 0x811C9DC5
    for byte in user_id.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


async def produce(urls: str, user: str, items: list[str], partitions: int) -> None:
    client = await nats.connect(servers=urls.split(","))
    js = client.jetstream()
    for item in items:
        event = events_pb2.PlaybackEvent(event_id=str(uuid.uuid4()), user_id=user,
                                         item_id=item, type=events_pb2.PLAY_COMPLETE,
                                         watch_fraction=1.0)
        event.occurred_at.FromNanoseconds(time.time_ns())
        ack = await js.publish(f"freshrec.events.{partition(user, partitions)}",
                               event.SerializeToString(),
                               headers={"Nats-Msg-Id": event.event_id})
        print(f"{item}: log sequence {ack.seq}{' (duplicate)' if ack.duplicate else ''}")
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-urls", default="nats://127.0.0.1:4222")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--user", required=True)
    parser.add_argument("--item", action="append", required=True)
    args = parser.parse_args()
    asyncio.run(produce(args.log_urls, args.user, args.item, args.partitions))


if __name__ == "__main__":
    main()
