"""Evaluation metrics of samples: diversity (Self-BLEU), semantic similarity, positional bias of a constraint."""
