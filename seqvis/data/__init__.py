"""Data: tfds datasets -> tf.data pipelines -> numpy batches sharded for devices."""
