"""Plan: which units and blocks a resize pairs, and the Mapping that records it."""
