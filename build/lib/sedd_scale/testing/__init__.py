"""Helpers for tests and benchmarks only (no training path imports them): local multi-process launches,
synthetic token streams, exact scores of enumerable distributions, live tensor and step memory."""
