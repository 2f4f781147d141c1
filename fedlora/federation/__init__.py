"""The server side of a run: the round loop, the replies as they arrive,
checkpoints and resume, the results on disk."""
