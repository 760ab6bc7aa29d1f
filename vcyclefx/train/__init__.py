"""Train: the V-cycle schedule, optimizer moments through a resize, and FLOP accounting."""
