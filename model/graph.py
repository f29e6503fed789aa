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

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from model.features import Batch, FeatureSpec

log = logging.getLogger(__name__)

TOWER_DIM = 32
HIDDEN = 64


@dataclass
class Packed:
    """A batch's slots as the step takes them (`TwoTowerRanker.pack`)."""

    emb: np.ndarray  # float32 (rows of every embedding slot, dim), slot after slot in field order
    emb_index: np.ndarray  # int32, per occurrence: its row in emb
    emb_segment: np.ndarray  # int32, per occurrence: example * fields + its slot's field
    bias_rows: np.ndarray  # float32 (user bias rows + item bias rows, 1)
    bias_index: np.ndarray  # int32 (2, n): each example's user bias row, item bias row
    dense: np.ndarray
    offsets: list[int]  # field k's rows are emb[offsets[k]:offsets[k + 1]]
    user_bias_rows: int

    @property
    def inputs(self) -> tuple:
        return self.emb, self.emb_index, self.emb_segment, self.bias_rows, self.bias_index, self.dense

    def sizes(self, n: int) -> tuple[int, int, int, int]:
        """The `padded_size`s of this batch of `n` examples: rows (one more, for a zero row to
        point padding at), occurrences, bias rows, examples."""
        return (padded_size(len(self.emb) + 1), padded_size(len(self.emb_index)), padded_size(len(self.bias_rows)),
                padded_size(n))

    def padded(self, n: int, sizes: tuple[int, int, int, int]) -> Packed:
        """The same batch of `n` examples padded to `sizes` (at least its own `sizes(n)`): rows,
        occurrences, bias rows, examples. Extra rows are zeros; extra occurrences point at a zero
        row and at segment -1, which the segment mean drops; extra examples have no occurrences,
        and the step gives them weight 0. So the real examples' scores and the real rows'
        gradients are as without padding."""
        rows, occ, brows = len(self.emb), len(self.emb_index), len(self.bias_rows)
        r_pad, o_pad, b_pad, n_pad = sizes
        emb = np.zeros((r_pad, self.emb.shape[1]), np.float32)
        emb[:rows] = self.emb
        index = np.full(o_pad, rows, np.int32)
        index[:occ] = self.emb_index
        segment = np.full(o_pad, -1, np.int32)
        segment[:occ] = self.emb_segment
        bias = np.zeros((b_pad, 1), np.float32)
        bias[:brows] = self.bias_rows
        bias_index = np.zeros((2, n_pad), np.int32)
        bias_index[:, :n] = self.bias_index
        dense = np.zeros((n_pad, self.dense.shape[1]), np.float32)
        dense[:n] = self.dense
        return Packed(emb, index, segment, bias, bias_index, dense, self.offsets, self.user_bias_rows)


def _dense_layer(name: str, fan_in: int, fan_out: int, seed: int) -> tuple[tf.Variable, tf.Variable]:
    init = tf.random.stateless_normal((fan_in, fan_out), seed=(seed, 7)) * np.sqrt(2.0 / (fan_in + fan_out))
    return (tf.Variable(tf.cast(init, tf.float32), name=f"{name}_w"),
            tf.Variable(tf.zeros((fan_out,), tf.float32), name=f"{name}_b"))


def limit_tf_threads(n: int) -> bool:
    """At most `n` threads for TensorFlow's ops and between ops in this process. Only possible
    before TensorFlow's first op; returns whether the setting holds.

    A step's ops are tiny: on a busy 2-core machine, threads that wait for a core made the train
    step at batch 8 about twice as slow as one thread, and batch 256 no faster (2026, TF 2.21)."""
    threading = tf.config.threading
    if threading.get_intra_op_parallelism_threads() == n and threading.get_inter_op_parallelism_threads() == n:
        return True
    try:
        threading.set_intra_op_parallelism_threads(n)
        threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:  # TensorFlow is running already: its threads stay as they are
        log.debug("TensorFlow already started: its thread settings stay as they are")
        return False
    return True


def _tensors(*arrays) -> list[tf.Tensor]:
    return [tf.constant(a) for a in arrays]


def padded_size(n: int) -> int:
    """`n` rounded up to one of two sizes per power of two (at least 16): XLA compiles the step
    once per input shape (a compilation takes about a second), so a batch's varying counts of
    examples, rows and occurrences are padded to a few shapes, at most half as large again."""
    if n <= 16:
        return 16
    step = 1 << max(0, n.bit_length() - 2)
    return -(-n // step) * step


class GraphRun:
    """A train step's graph, run or running (`TwoTowerRanker.start_train`)."""

    def __init__(self, outputs: Any, packed: Packed, batch: Batch, n: int, field_slots: tuple[str, ...]):
        self.future: Optional[Future] = outputs if isinstance(outputs, Future) else None
        self._outputs = outputs
        self._packed, self._batch, self._n, self._field_slots = packed, batch, n, field_slots

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def result(self) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """(loss, scores before the update, gradient of each slot's rows), once the graph ran."""
        p, n = self._packed, self._n
        loss, scores, g_emb, g_bias = self._outputs if self.future is None else self.future.result()
        g_emb, g_bias = g_emb.numpy(), g_bias.numpy()
        grads = {s: g_emb[p.offsets[k]:p.offsets[k + 1]] for k, s in enumerate(self._field_slots)}
        ub, ib = p.user_bias_rows, len(self._batch.slots["item_id.bias"].ids)
        grads["user_id.bias"], grads["item_id.bias"] = g_bias[:ub], g_bias[ub:ub + ib]
        return float(loss), scores.numpy()[:n], grads


class _FusedAdam(tf.Module):
    """Keras's Adam (same defaults, same update) with one fused op per variable.

    Keras's Adam spends about ten small ops per variable each step, which at a batch of 8 cost
    more than the model itself. Its slots are made here, before the step is traced, so the step
    traces once."""

    def __init__(self, variables, learning_rate: float, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7):
        super().__init__(name="adam")
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self.learning_rate = tf.Variable(learning_rate, dtype=tf.float32, trainable=False, name="learning_rate")
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False, name="m") for v in variables]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False, name="v") for v in variables]

    def apply(self, grads, variables) -> None:
        step = tf.cast(self.iterations + 1, tf.float32)
        b1, b2 = tf.constant(self.beta_1), tf.constant(self.beta_2)
        b1_power, b2_power = tf.pow(b1, step), tf.pow(b2, step)
        for var, m, v, g in zip(variables, self.m, self.v, grads, strict=True):
            # var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon), as Keras.
            tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=b1_power,
                                         beta2_power=b2_power, lr=self.learning_rate, beta1=b1, beta2=b2,
                                         epsilon=tf.constant(self.epsilon), grad=g)
        self.iterations.assign_add(1)

    def update(self, grads, weights, m, v, iterations):
        """`apply` as arithmetic on tensors (the loop of `TwoTowerRanker._train_steps` carries the
        weights and slots, which XLA then fuses): (weights, m, v) after one step at `iterations`.
        The formulas of `ResourceApplyAdam`."""
        step = tf.cast(iterations + 1, tf.float32)
        b1, b2 = tf.constant(self.beta_1), tf.constant(self.beta_2)
        alpha = self.learning_rate * tf.sqrt(1.0 - tf.pow(b2, step)) / (1.0 - tf.pow(b1, step))
        out_w, out_m, out_v = [], [], []
        for w, m1, v1, g in zip(weights, m, v, grads, strict=True):
            m2 = m1 + (g - m1) * (1.0 - b1)
            v2 = v1 + (tf.square(g) - v1) * (1.0 - b2)
            out_w.append(w - m2 * alpha / (tf.sqrt(v2) + self.epsilon))
            out_m.append(m2)
            out_v.append(v2)
        return out_w, out_m, out_v


class TwoTowerRanker(tf.Module):
    """user tower · item tower (retrieval) + cross-network head (ranking)."""

    def __init__(self, spec: FeatureSpec, learning_rate: float = 2e-3, seed: int = 1, threads: Optional[int] = 1,
                 jit_compile: bool = False):
        """`threads` (default 1) sets TensorFlow's intra- and inter-op threads for the whole
        process, if TensorFlow has not started yet (None: leave them): see `limit_tf_threads`.
        `jit_compile` compiles the train and scoring steps with XLA, one program per padded input
        shape (see `Packed.padded`). Off by default: measured on the team's busy 2-core machine
        (2026, TF 2.21), at a batch of 8 the XLA step alone took half the CPU time of the plain
        one, but a whole online step (pulls, pushes, padding) about the same CPU and 15-35 % less
        wall time; at a batch of 256 the XLA step was twice as slow, compilations included."""
        if threads is not None:
            limit_tf_threads(threads)
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
        self.optimizer = _FusedAdam(self.trainable_variables, learning_rate)
        # Fields in tower order: the user side's slots, then the item side's.
        self._field_slots = (*spec.user_side, *spec.item_side)
        self._fields = len(self._field_slots)
        self._user_width = n_user * d
        # The step takes every slot packed into a few tensors (see `Packed`): one gather and one
        # segment mean, and few inputs to convert per call. One trace for every batch.
        floats, ints = tf.TensorSpec([None, d], tf.float32), tf.TensorSpec([None], tf.int32)
        packed = [floats, ints, ints, tf.TensorSpec([None, 1], tf.float32), tf.TensorSpec([2, None], tf.int32),
                  tf.TensorSpec([None, f], tf.float32)]
        vec = tf.TensorSpec([None], tf.float32)
        self.jit_compile = jit_compile
        self._padded_sizes: dict[str, tuple[int, int, int, int]] = {}
        self._step = tf.function(self._train, input_signature=[*packed, vec, vec, tf.TensorSpec([], tf.float32)],
                                 jit_compile=jit_compile)
        self._score_packed = tf.function(self._score_logits, input_signature=[*packed, tf.TensorSpec([], tf.int32)],
                                         jit_compile=jit_compile)
        self._concrete_fns: dict = {}
        # Many steps in one call (see `train_steps`), compiled with XLA: a loop of tiny steps is
        # where TensorFlow's per-op cost outweighs the arithmetic.
        rows, acc = tf.TensorSpec([None, d], tf.float32), tf.TensorSpec([None, d], tf.float32)
        col, brow = tf.TensorSpec([None, 1], tf.float32), tf.TensorSpec([None, 1], tf.float32)
        table = tf.TensorSpec([None, None], tf.int32)
        per_step = [table, table, table, table, tf.TensorSpec([None, 2, None], tf.int32), tf.TensorSpec([None, None, f], tf.float32),
                    tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.float32),
                    tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.int32)]
        self._steps = tf.function(self._train_steps, jit_compile=True, autograph=False, input_signature=[
            rows, acc, col, col, ints, brow, brow, col, col, ints, *per_step])
        self._steps_sizes: Optional[tuple[int, ...]] = None
        self.steps_programs = 0  # the input sizes `train_steps` has padded to: XLA compiles a program for each
        # The exported signature keeps its per-slot inputs (rows, indices, example ids by slot).
        rows = {s: tf.TensorSpec([None, spec.width(s)], tf.float32) for s in spec.slots}
        by_slot = {s: ints for s in spec.slots}
        self._score = tf.function(self._forward, input_signature=[rows, by_slot, by_slot, tf.TensorSpec([None, f], tf.float32),
                                                                  tf.TensorSpec([], tf.int32)])

    # -- the graph ---------------------------------------------------------------------------

    def _forward_packed(self, emb, emb_index, emb_segment, bias_rows, bias_index, dense, n, weights=None):
        """(rank, dot, u, v) from packed inputs (see `Packed`): `emb` holds every embedding slot's
        rows, `emb_index` each occurrence's row in it and `emb_segment` its example * fields + field;
        `bias_rows` the user then item bias rows, `bias_index` (2, n) each example's. `weights`: the
        dense weights to use, in `trainable_variables` order (default: the variables)."""
        w = self._named(weights)
        d, k = self.spec.dim, self._fields
        pooled = tf.math.unsorted_segment_mean(tf.gather(emb, emb_index), emb_segment, n * k)
        # Segments run example-major in tower order (user side, then item side), so each example's
        # fields are one row of (n, k * d): the towers' inputs are its two halves.
        flat = tf.reshape(pooled, [n, k * d])
        bias = tf.reduce_sum(tf.reshape(tf.gather(bias_rows, bias_index), [2, n]), axis=0) + w["global_bias"]
        u_in, i_emb = flat[:, :self._user_width], flat[:, self._user_width:]
        i_in = tf.concat([i_emb, dense], axis=1)
        u = tf.nn.relu(u_in @ w["user1_w"] + w["user1_b"]) @ w["user2_w"] + w["user2_b"]
        v = tf.nn.relu(i_in @ w["item1_w"] + w["item1_b"]) @ w["item2_w"] + w["item2_b"]
        dot = tf.reduce_sum(u * v, axis=1) + bias
        x0 = tf.concat([flat, dense, u, v, u * v], axis=1)  # = [u_in, i_in, u, v, u * v]
        x1 = x0 * (x0 @ w["cross_w"] + w["cross_b"]) + x0  # one DCN-v2 cross layer
        h = tf.nn.relu(x1 @ w["head1_w"] + w["head1_b"])
        rank = tf.squeeze(h @ w["head2_w"] + w["head2_b"], axis=1) + dot
        # FM's pairwise term over every field's pooled row: sum over pairs i<j of <e_i, e_j>.
        # No weights of its own; it lifted MovieLens's online AUC from 0.765 to 0.769.
        fields = tf.reshape(pooled, [n, k, d])
        fm = 0.5 * tf.reduce_sum(tf.square(tf.reduce_sum(fields, 1)) - tf.reduce_sum(tf.square(fields), 1), 1)
        rank = rank + fm
        return rank, dot, u, v

    def _named(self, weights=None) -> dict:
        """The dense weights by variable name: the variables, or `weights` in their order."""
        names = [v.name.split(":")[0] for v in self.trainable_variables]
        return dict(zip(names, self.trainable_variables if weights is None else weights, strict=True))

    def _forward(self, rows: dict, index: dict, example: dict, dense, n):
        """(rank, dot, u, v) from each slot's rows, row indices and example ids: packs them and
        runs `_forward_packed`."""
        emb, idx, seg, offset = [], [], [], 0
        for k, s in enumerate(self._field_slots):
            emb.append(rows[s])
            idx.append(index[s] + offset)
            seg.append(example[s] * self._fields + k)
            offset += tf.shape(rows[s])[0]
        u_bias, i_bias = rows["user_id.bias"], rows["item_id.bias"]
        bias_index = tf.stack([index["user_id.bias"], index["item_id.bias"] + tf.shape(u_bias)[0]])
        return self._forward_packed(tf.concat(emb, 0), tf.concat(idx, 0), tf.concat(seg, 0),
                                    tf.concat([u_bias, i_bias], 0), bias_index, dense, n)

    def _score_logits(self, emb, emb_index, emb_segment, bias_rows, bias_index, dense, n):
        return tf.sigmoid(self._forward_packed(emb, emb_index, emb_segment, bias_rows, bias_index, dense, n)[0])

    def _train(self, emb, emb_index, emb_segment, bias_rows, bias_index, dense, labels, weights, count):
        """`count`: the examples in the batch (`labels` may be padded past them with weight 0)."""
        n = tf.shape(labels)[0]
        with tf.GradientTape() as tape:
            tape.watch([emb, bias_rows])
            rank, dot, _, _ = self._forward_packed(emb, emb_index, emb_segment, bias_rows, bias_index, dense, n)
            bce = tf.nn.sigmoid_cross_entropy_with_logits
            # Importance weights (1/rate) correct the sampled-out negatives; nothing else does.
            per_example = weights * (bce(labels=labels, logits=rank) + bce(labels=labels, logits=dot))
            loss = tf.reduce_sum(per_example) / count
        variables = self.trainable_variables
        grads = tape.gradient(loss, [emb, bias_rows, *variables])
        self.optimizer.apply(grads[2:], variables)
        return loss, tf.sigmoid(rank), tf.convert_to_tensor(grads[0]), tf.convert_to_tensor(grads[1])

    def _train_steps(self, emb, acc, lr, eps, ready, bias, bacc, blr, beps, bready,
                     step_rows, occ_index, occ_segment, step_bias, bias_index, dense, labels, weights, counts, steps):
        """`steps` train steps in order, each as `_train` on its examples, over one working set of
        rows: `emb` (every embedding slot's rows) and `bias` (the bias rows) with their Adagrad
        accumulators `acc`, `bacc`, learning rates `lr`, `blr` and epsilons `eps`, `beps` per row.
        A row reads zeros and takes no update before step `ready` (its id not admitted yet).
        Step i takes its distinct rows `step_rows[i]` of `emb` and `step_bias[i]` of `bias` (padded
        with rows never ready), its occurrences `occ_index[i]` (into `step_rows[i]`) and
        `occ_segment[i]`, `bias_index[i]` (into `step_bias[i]`), and its examples' `dense[i]`,
        `labels[i]`, `weights[i]`; `counts[i]` of them are real. After each step its rows take the
        store's sparse Adagrad on the gradient of the summed loss (`OnlineTrainer.train` pushes the
        mean's times the batch size) and the dense weights Adam's: step i + 1 sees step i's updates.
        Returns the rows and accumulators after the last step, each step's scores (taken before
        its update) and loss."""
        n = tf.shape(labels)[1]
        k = tf.shape(labels)[0]
        bce = tf.nn.sigmoid_cross_entropy_with_logits
        variables = self.trainable_variables

        def adagrad(table, accs, rates, epsilons, ready_at, rows, i, g):
            live = (tf.gather(ready_at, rows) <= i)[:, None]
            w, a = tf.gather(table, rows), tf.gather(accs, rows)
            a2 = a + g * g
            w2 = w - g / (tf.sqrt(a2) + tf.gather(epsilons, rows)) * tf.gather(rates, rows)
            # Padding rows repeat, never ready: each writes back the value it had.
            at = rows[:, None]
            return (tf.tensor_scatter_nd_update(table, at, tf.where(live, w2, w)),
                    tf.tensor_scatter_nd_update(accs, at, tf.where(live, a2, a)))

        def step(i, emb, acc, bias, bacc, scores, losses, flat_w, adam_m, adam_v):
            rows, brows = step_rows[i], step_bias[i]
            dense_w = self._unflat(flat_w)
            e_in = tf.where((tf.gather(ready, rows) <= i)[:, None], tf.gather(emb, rows), 0.0)
            b_in = tf.where((tf.gather(bready, brows) <= i)[:, None], tf.gather(bias, brows), 0.0)
            with tf.GradientTape() as tape:
                tape.watch([e_in, b_in, *dense_w])
                rank, dot, _, _ = self._forward_packed(e_in, occ_index[i], occ_segment[i], b_in, bias_index[i],
                                                       dense[i], n, dense_w)
                w = weights[i]
                per_example = w * (bce(labels=labels[i], logits=rank) + bce(labels=labels[i], logits=dot))
                loss = tf.reduce_sum(per_example) / counts[i]
            grads = tape.gradient(loss, [e_in, b_in, *dense_w])
            (flat_w,), (adam_m,), (adam_v,) = adam.update([self._flat(grads[2:])], [flat_w], [adam_m], [adam_v],
                                                          adam.iterations + tf.cast(i, tf.int64))
            emb, acc = adagrad(emb, acc, lr, eps, ready, rows, i, tf.convert_to_tensor(grads[0]) * counts[i])
            bias, bacc = adagrad(bias, bacc, blr, beps, bready, brows, i, tf.convert_to_tensor(grads[1]) * counts[i])
            return (i + 1, emb, acc, bias, bacc, scores.write(i, tf.sigmoid(rank)), losses.write(i, loss),
                    flat_w, adam_m, adam_v)

        adam = self.optimizer
        scores = tf.TensorArray(tf.float32, size=k, element_shape=[None])
        losses = tf.TensorArray(tf.float32, size=k, element_shape=[])
        # The dense weights and Adam's slots ride the loop as tensors and are stored at its end, each
        # as one flat vector: Adam's update is then three fused ops a step, not three per variable
        # (each op costs the loop about a microsecond besides its arithmetic).
        carried = [self._flat(vs) for vs in (variables, adam.m, adam.v)]
        _, emb, acc, bias, bacc, scores, losses, flat_w, flat_m, flat_v = tf.while_loop(
            lambda i, *_: i < steps, step, [tf.constant(0), emb, acc, bias, bacc, scores, losses, *carried],
            maximum_iterations=k)
        for targets, flat in ((variables, flat_w), (adam.m, flat_m), (adam.v, flat_v)):
            for var, value in zip(targets, self._unflat(flat), strict=True):
                var.assign(value)
        adam.iterations.assign_add(tf.cast(steps, tf.int64))
        return emb, acc, bias, bacc, scores.stack(), losses.stack()

    def _flat(self, tensors) -> tf.Tensor:
        """Tensors shaped as `trainable_variables`, as one vector (see `_unflat`)."""
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)

    def _unflat(self, flat) -> list[tf.Tensor]:
        """`_flat`'s vector as tensors shaped as `trainable_variables`."""
        shapes = [v.shape for v in self.trainable_variables]
        parts = tf.split(flat, [int(np.prod(s)) for s in shapes])
        return [tf.reshape(p, s) for p, s in zip(parts, shapes, strict=True)]

    def _grow_steps_sizes(self, m: int, mb: int, k: int, u: int, o: int, ub: int, n: int) -> tuple[int, ...]:
        """The padded sizes of `train_steps`'s inputs for `m` rows, `mb` bias rows, `k` steps, `u`
        rows, `o` occurrences and `ub` bias rows a step, `n` examples a step: the sizes so far,
        grown (with room) where these do not fit."""

        def room(x: int) -> int:
            return padded_size(x + x // 2 + 1)

        need = (m + 1, mb + 1, k, u + 1, o, ub + 1, n)
        seen = self._steps_sizes
        if seen is None or any(a > b for a, b in zip(need, seen, strict=True)):
            # Grow every size with room, so that a stream compiles a program or two, not one per chunk.
            grown = (room(m), room(mb), k, room(u), room(o), room(ub), n)
            self._steps_sizes = grown if seen is None else tuple(max(a, b) for a, b in zip(grown, seen, strict=True))
            self.steps_programs += 1
        return self._steps_sizes

    def compile_steps(self, m: int, mb: int, k: int, u: int, o: int, ub: int, n: int) -> float:
        """Compile `train_steps`'s program ahead of its calls, for inputs of the sizes of
        `_grow_steps_sizes` (a call that needs more compiles again), and run it once for one step
        on inputs that learn nothing: its rows zeros and never ready, its examples of weight 0.
        That step still moves Adam's count (and its slots, were they not zeros), so every variable
        is then set back to what it held: nothing learns. Returns the seconds it took (tracing,
        XLA's compilation and the step).

        The step is there for the first call's sake: a new program's first run of its loop took
        40-75 ms longer than its later runs (measured on the online pass at batch 8, 1,024 steps
        a call, first call 250-320 ms against 200-270 ms for the next), which its first call would
        otherwise pay."""
        t0 = time.perf_counter()
        mp, mbp, kp, up, op, ubp, n_p = self._grow_steps_sizes(m, mb, k, u, o, ub, n)
        d, f = self.spec.dim, len(self.spec.dense)
        never = np.int32(np.iinfo(np.int32).max)
        zeros, ones = np.zeros, np.ones
        rows = [zeros((mp, d), np.float32), zeros((mp, d), np.float32), zeros((mp, 1), np.float32),
                ones((mp, 1), np.float32), np.full(mp, never), zeros((mbp, 1), np.float32), zeros((mbp, 1), np.float32),
                zeros((mbp, 1), np.float32), ones((mbp, 1), np.float32), np.full(mbp, never)]
        per_step = [zeros((kp, up), np.int32), zeros((kp, op), np.int32), np.full((kp, op), -1, np.int32),
                    zeros((kp, ubp), np.int32), zeros((kp, 2, n_p), np.int32), zeros((kp, n_p, f), np.float32),
                    zeros((kp, n_p), np.float32), zeros((kp, n_p), np.float32), ones(kp, np.float32), np.int32(1)]
        held = [v.numpy() for v in self.variables]
        for out in self._concrete("_steps")(*_tensors(*rows, *per_step)):
            out.numpy()
        for var, value in zip(self.variables, held, strict=True):
            var.assign(value)
        return time.perf_counter() - t0

    def train_steps(self, rows: dict[str, np.ndarray], per_step: dict[str, np.ndarray], steps: int,
                    beside_graph: Optional[Callable[[], object]] = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`_train_steps` on numpy arrays (`rows`: emb, acc, lr, eps, ready, bias, bacc, blr, beps,
        bready; `per_step`: step_rows, occ_index, occ_segment, step_bias, bias_index, dense, labels,
        weights, counts; row paddings in `step_rows` and `step_bias` are -1), padded to the largest
        sizes seen so far, with room to spare (XLA compiles one program per shape, in about two
        seconds): extra rows are zeros that are never ready, extra occurrences fall in no segment,
        extra examples weigh 0 and extra steps do not run. Returns the real part of the results.
        `beside_graph` is called once the inputs are padded and converted, just before the graph
        runs: a thread it starts then takes the GIL only from the graph, which releases it."""
        m, mb = len(rows["emb"]), len(rows["bias"])
        k, u = per_step["step_rows"].shape
        o, ub = per_step["occ_index"].shape[1], per_step["step_bias"].shape[1]
        n = per_step["labels"].shape[1]

        mp, mbp, kp, up, op, ubp, n_p = self._grow_steps_sizes(m, mb, k, u, o, ub, n)
        never = np.int32(np.iinfo(np.int32).max)

        def pad(a, shape, fill=0):
            if a.shape == shape:
                return a
            out = np.full(shape, fill, a.dtype)
            out[tuple(slice(0, x) for x in a.shape)] = a
            return out

        def rows_of(a, shape, dummy):
            out = pad(a, shape, dummy)
            out[out < 0] = dummy
            return out

        d = self.spec.dim
        inputs = [pad(rows["emb"], (mp, d)), pad(rows["acc"], (mp, d)), pad(rows["lr"], (mp, 1)),
                  pad(rows["eps"], (mp, 1), 1.0), pad(rows["ready"], (mp,), never),
                  pad(rows["bias"], (mbp, 1)), pad(rows["bacc"], (mbp, 1)), pad(rows["blr"], (mbp, 1)),
                  pad(rows["beps"], (mbp, 1), 1.0), pad(rows["bready"], (mbp,), never),
                  rows_of(per_step["step_rows"], (kp, up), m), pad(per_step["occ_index"], (kp, op)),
                  pad(per_step["occ_segment"], (kp, op), -1), rows_of(per_step["step_bias"], (kp, ubp), mb),
                  pad(per_step["bias_index"], (kp, 2, n_p)), pad(per_step["dense"], (kp, n_p, len(self.spec.dense))),
                  pad(per_step["labels"], (kp, n_p)), pad(per_step["weights"], (kp, n_p)),
                  pad(per_step["counts"], (kp,), 1.0), np.int32(steps)]
        tensors = _tensors(*inputs)
        if beside_graph is not None:
            beside_graph()
        emb, acc, bias, bacc, scores, losses = self._concrete("_steps")(*tensors)
        return (emb.numpy()[:m], acc.numpy()[:m], bias.numpy()[:mb], bacc.numpy()[:mb],
                scores.numpy()[:steps, :n], losses.numpy()[:steps])

    # -- numpy in, numpy out -----------------------------------------------------------------

    def pack(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray) -> Packed:
        """The batch's slots packed for the step: rows one slot after another, indices shifted by
        each slot's offset, segments by example and field; `offsets` splits the gradients back."""
        spec = self.spec
        emb, idx, seg, offsets, at = [], [], [], [], 0
        for k, s in enumerate(self._field_slots):
            slot = batch.slots[s]
            emb.append(rows[s].reshape(-1, spec.dim))
            idx.append(slot.index + at)
            seg.append(slot.example * self._fields + k)
            offsets.append(at)
            at += len(slot.ids)
        offsets.append(at)
        u_bias, i_bias = rows["user_id.bias"].reshape(-1, 1), rows["item_id.bias"].reshape(-1, 1)
        bias_index = np.stack([batch.slots["user_id.bias"].index, batch.slots["item_id.bias"].index + len(u_bias)])
        return Packed(np.concatenate(emb), np.concatenate(idx), np.concatenate(seg), np.concatenate([u_bias, i_bias]),
                      bias_index.astype(np.int32, copy=False), np.asarray(dense, np.float32), offsets, len(u_bias))

    def train(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray
              ) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """One step: (loss, scores before the update, gradient of each slot's rows)."""
        return self.start_train(batch, rows, dense).result()

    def start_train(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray,
                    run: Optional[Callable[..., Future]] = None
                    ) -> GraphRun:
        """`train` in two halves: the graph's inputs are made here, and the `GraphRun` returned
        waits for the graph and gives `train`'s result. `run` (an executor's `submit`; None: run
        it here) runs the graph elsewhere: TensorFlow lets go of the GIL while it runs, so the
        caller's thread carries on meanwhile. Nothing else may use the graph until the result is
        taken (its weights change inside the step)."""
        n = batch.size
        p, n_pad = self._packed(batch, rows, dense, "_step")
        labels, weights = batch.labels, batch.weights
        if n_pad != n:
            labels, weights = np.zeros(n_pad, np.float32), np.zeros(n_pad, np.float32)
            labels[:n], weights[:n] = batch.labels, batch.weights
        fn, args = self._concrete("_step"), _tensors(*p.inputs, labels, weights, np.float32(n))
        return GraphRun(fn(*args) if run is None else run(fn, *args), p, batch, n, self._field_slots)

    def score(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray) -> np.ndarray:
        p, n_pad = self._packed(batch, rows, dense, "_score_packed")
        return self._concrete("_score_packed")(*_tensors(*p.inputs, np.int32(n_pad))).numpy()[:batch.size]

    def _packed(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray, fn: str) -> tuple[Packed, int]:
        p = self.pack(batch, rows, dense)
        if not self.jit_compile:
            return p, batch.size
        # Shapes only grow: each batch is padded to the largest sizes seen so far, so a stream of
        # batches of one size compiles a handful of programs, then none (their rows and
        # occurrences vary from batch to batch, and every compilation costs about a second).
        seen = self._padded_sizes.get(fn)
        sizes = p.sizes(batch.size)
        if seen is not None:
            sizes = tuple(max(a, b) for a, b in zip(sizes, seen, strict=True))
        if sizes != seen:  # (a tf.Module's dict is tracked: setting an item is slow)
            self._padded_sizes[fn] = sizes
        return p.padded(batch.size, sizes), sizes[3]

    def _concrete(self, name: str):
        # Calling the traced graph with tensors skips tf.function's argument binding and numpy
        # conversion, about as long as the graph itself at a batch of 8.
        fn = self._concrete_fns.get(name)
        if fn is None:
            fn = self._concrete_fns[name] = getattr(self, name).get_concrete_function()
        return fn

    def _inputs(self, batch: Batch, rows: dict[str, np.ndarray], dense: np.ndarray):
        """The per-slot inputs of `_forward` and the exported `score` signature."""
        spec = self.spec
        r = {s: tf.constant(rows[s].reshape(-1, spec.width(s)), tf.float32) for s in spec.slots}
        idx = {s: tf.constant(batch.slots[s].index) for s in spec.slots}
        ex = {s: tf.constant(batch.slots[s].example) for s in spec.slots}
        return r, idx, ex, tf.constant(dense, tf.float32)

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
