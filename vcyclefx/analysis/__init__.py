"""Analysis: the spaces (resizable axes) and chains (repeated blocks) of a captured graph, from one rule per op."""
