"""Chaos harness (``make chaos``): hostile input and injected faults against real consumer and
trainer processes on a private Kafka + Redis stack; writes ``docs/reliability.md``."""
