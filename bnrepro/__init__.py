"""bnrepro: a faithful, fast reproduction of Ioffe & Szegedy (2015), Batch Normalization."""

__version__ = "0.1.0"
