"""Shared core of the streaming segmentation service: what the consumer and the trainer must
compute identically (event schema, output contracts, features, model bundle, Redis store, matching,
settings, metrics)."""
