"""The compact graph file's format tag: part of every graph's cache key, so a format change
recomputes the graphs (kept apart from the storage code, which imports torch)."""

#: 2: graphs store ``bos_mlp`` (each layer's MLP write at BOS, its direct effect per target)
GRAPH_FORMAT = "em_circuits.compact_graph/2"
#: Formats :func:`~em_circuits.attribution.storage.load_compact` reads (1: without ``bos_mlp``)
READABLE_GRAPH_FORMATS = ("em_circuits.compact_graph/1", GRAPH_FORMAT)
