"""The client side of a round: the client loop a ClientApp runs, the session
it opens per message, the mods that wrap its training step (attacks), its
state on disk, the warm trainer of a deployed node and the link to it, the
SuperNode launcher."""
