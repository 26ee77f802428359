"""Keras layers that read a position table by slicing and broadcasting it, not by ids: a
faithful copy of Keras-Hub's ``PositionEmbedding`` and ``TokenAndPositionEmbedding`` (keras-hub
0.32, ``keras_hub/src/layers/modeling/position_embedding.py``), written here because keras-hub
needs tensorflow-text, which pins the full ``tensorflow`` package beside this project's
``tensorflow-cpu``. Shared by the TensorFlow tests and the Keras-on-torch subprocess script."""
from __future__ import annotations

import keras
from keras import ops


class PositionEmbedding(keras.layers.Layer):
    """Keras-Hub's learned position embedding: ``call(inputs)`` returns rows
    ``start_index .. start_index + T`` of a (sequence_length, D) table (or rows ``positions``),
    broadcast to the shape of ``inputs`` (B, T, D)."""

    def __init__(self, sequence_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = int(sequence_length)
        self.initializer = keras.initializers.get(initializer)

    def build(self, inputs_shape):
        self.position_embeddings = self.add_weight(
            name="embeddings", shape=[self.sequence_length, inputs_shape[-1]],
            initializer=self.initializer, trainable=True)
        self.built = True

    def call(self, inputs, start_index=0, positions=None):
        shape = ops.shape(inputs)
        table = ops.convert_to_tensor(self.position_embeddings)
        if positions is not None:
            if len(ops.shape(positions)) == 1:
                positions = ops.expand_dims(positions, axis=0)
            table = ops.take(table, positions, axis=0)
        else:
            table = ops.slice(table, (start_index, 0), (shape[-2], shape[-1]))
        return ops.broadcast_to(table, shape)

    def compute_output_shape(self, input_shape):
        return input_shape


class TokenAndPositionEmbedding(keras.layers.Layer):
    """Keras-Hub's token + position embedding: an ``Embedding`` of the ids plus the
    ``PositionEmbedding`` of the result."""

    def __init__(self, vocabulary_size, sequence_length, embedding_dim, **kwargs):
        super().__init__(**kwargs)
        self.token_embedding = keras.layers.Embedding(vocabulary_size, embedding_dim, name="token_embedding")
        self.position_embedding = PositionEmbedding(sequence_length, name="position_embedding")

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.token_embedding.build(input_shape)
        self.position_embedding.build(input_shape + (self.token_embedding.output_dim,))
        self.built = True

    def call(self, inputs, start_index=0, positions=None):
        tokens = self.token_embedding(inputs)
        return tokens + self.position_embedding(tokens, start_index=start_index, positions=positions)


class Scaled(keras.layers.Layer):
    """Reads its position table scaled (not a pure row selection): embgrad cannot tell which
    rows an output came from, so the table counts as used outside its lookups."""

    def build(self, inputs_shape):
        self.embeddings = self.add_weight(name="embeddings", shape=[8, inputs_shape[-1]])
        self.built = True

    def call(self, inputs):
        shape = ops.shape(inputs)
        return ops.broadcast_to(ops.slice(self.embeddings, (0, 0), (shape[-2], shape[-1])) * 2.0, shape)


class ThreeTables(keras.layers.Layer):
    """Hugging Face's TF ``*Embeddings`` pattern: word, position and token-type tables read in
    one layer (three 2-D variables, none a Keras Embedding)."""

    def build(self, input_shape):
        self.word = self.add_weight(name="word_embeddings", shape=[10, 4])
        self.position = self.add_weight(name="position_embeddings", shape=[6, 4])
        self.token_type = self.add_weight(name="token_type_embeddings", shape=[2, 4])
        self.built = True

    def call(self, ids):
        T = ops.shape(ids)[1]
        return (ops.take(self.word, ids, axis=0) + ops.slice(self.position, (0, 0), (T, 4))[None]
                + ops.take(self.token_type, ops.zeros_like(ids), axis=0))
