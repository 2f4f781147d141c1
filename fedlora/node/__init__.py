"""The client side of a round: the client loop a ClientApp runs, its state on
disk, the warm trainer of a deployed node and the link to it, the SuperNode
launcher."""
