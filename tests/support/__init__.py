"""Helpers shared by the tests: ``stack`` (the local Kafka and Redis: settings, producing,
reading, a running consumer, private brokers and Redis servers), ``messages`` (consumed messages
and small models for the per-message path, no broker), ``prometheus`` (a real Prometheus and the
alert rules)."""
