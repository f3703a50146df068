"""The private Keras API the library relies on, one function per use.

Written for keras 3.15 (tensorflow 2.21). tests/test_compat.py touches every private name used
here, so an upgrade that removes one fails there, naming the function to update.
"""


def is_graph_model(model):
    """Whether `model` is a functional model (one graph of layers `clone_model` can walk), not a
    Sequential or a subclassed model with its own `call`."""
    # Functional._run_through_graph: Keras exports no Functional class to test against (Keras 3.15).
    return hasattr(model, "_run_through_graph")


def consumers(layer):
    """The layers (operations) that take `layer`'s output in a functional model."""
    # Operation._outbound_nodes, Node.operation: Keras exports no graph traversal (Keras 3.15).
    return [node.operation for node in layer._outbound_nodes]
