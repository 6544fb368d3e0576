"""Tandem's tests, one folder per kind: unit/ (no server, no process: fast), service/ (in-process gRPC servers on
port 0 over tiny models the tests train), e2e/ (`tandem serve` and clients as processes), deploy/ (manifests and
Dockerfiles read as data) and fuzz/ (hostile input to every service). Helpers: harness.py builds in-process stacks,
status.py reads error details, fixtures/ builds the tiny models."""

from pathlib import Path

# The repository root, for tests that read its files or run commands in it.
ROOT = Path(__file__).resolve().parent.parent
