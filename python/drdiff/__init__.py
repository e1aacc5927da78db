"""DrDiff's PyTorch side: the model with the C++ library's tensor names, the corpus and tokenizer,
the trainer, the exporter to the library's model directory, and the quality measures."""

__version__ = "0.1.0"
