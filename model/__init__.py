"""The model component: the TensorFlow graph, its train step and the model server.

It owns no sparse parameters: it asks paramserver/ for the rows of a batch."""
