"""Config writers, one module per target format; each takes a model already fitted by translate."""
