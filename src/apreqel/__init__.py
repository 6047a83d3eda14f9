"""apreqel: adaptive mixed-precision quantization of GGUF models for edge devices."""

__version__ = "0.1.0"
