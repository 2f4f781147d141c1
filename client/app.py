"""Flower ClientApp.

On a node whose config names a warm trainer (``trainer='ADDR'``: docker-compose.yml's
default), each message is forwarded to it (``fedlora.node.trainer_link``) and this
process imports no training stack. Otherwise every training and evaluation
message runs here, through ``fedlora.node.client_loop``, the same for every
strategy (imported only then).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.node import trainer_link

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    if trainer_link.configured(context.node_config):
        return trainer_link.forward(message, context)
    from fedlora.node.client_loop import handle_train

    return handle_train(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    if trainer_link.configured(context.node_config):
        return trainer_link.forward(message, context)
    from fedlora.node.client_loop import handle_evaluate

    return handle_evaluate(message, context)
