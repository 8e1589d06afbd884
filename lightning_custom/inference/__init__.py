"""After training: pipeline loading and sampling, evaluation and its metrics."""
