"""The fedlora Flower ClientApp."""
