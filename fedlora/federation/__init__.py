"""The server side of a run: the round loop (``loop``), the server round
around the strategy (``round``: ``intake`` of replies, the ``fold`` pipeline,
the ``record``), the replies as they arrive, checkpoints and resume, the
results on disk."""
