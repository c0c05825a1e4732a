"""Software-defined assets, one module per domain: data, training, evaluation, serving."""
