"""The fedlora Flower ServerApp."""
