"""BITA: remote-sensing image captioning with an Interactive Fourier Transformer.

The library is importable without Hydra; `python -m bita.run` is the Hydra front end.
`bita.Captioner` is imported on first use so that `import bita` stays light.
"""

__version__ = "0.1.0"

__all__ = ["Captioner", "__version__"]


def __getattr__(name: str):
    if name == "Captioner":
        from bita.caption import Captioner

        return Captioner
    raise AttributeError(f"module 'bita' has no attribute {name!r}")
