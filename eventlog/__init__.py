"""The log mode: events from a partitioned NATS JetStream log (imported only when used)."""
