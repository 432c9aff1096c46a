"""The compact graph file's format tag: part of every graph's cache key, so a format change
recomputes the graphs (kept apart from the storage code, which imports torch)."""

GRAPH_FORMAT = "em_circuits.compact_graph/1"
