"""`tandem bench`: closed-loop load against a running gateway, measured beside the bare model."""
