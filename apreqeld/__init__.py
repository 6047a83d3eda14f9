"""apreqeld: an on-device adaptive runtime for llama.cpp models (APreQEL plan sets, served and
hot-swapped by a daemon)."""

__version__ = "0.2.0"
