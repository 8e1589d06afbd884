"""Models and data made on the spot, offline: tokenizers, published architectures with random weights, tiny models,
the embedded assets ' paths, and the micro world's procedural images, concepts and encoder."""
