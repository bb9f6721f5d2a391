"""BITA's model layer: frozen image towers, the Interactive Fourier Transformer, the prefix LM,
their composition with the ITC and prefix-LM losses, and the authors' checkpoint layout.

Entry point: `bita.models.build.build_model(cfg)`.
"""
