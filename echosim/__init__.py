"""echosim: the ECHO scheduler core and a SimPy simulator of speculative decoding under load."""

__version__ = "0.1.0"
