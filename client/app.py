"""Flower ClientApp: every training and evaluation message goes through
``fedlora.client_loop``, the same for every strategy."""

from fedlora.client_loop import client_app

app = client_app()
