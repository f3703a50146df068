"""Training of repvgg_keras models: tensorflow-datasets input, the paper's recipes, tf.distribute."""
