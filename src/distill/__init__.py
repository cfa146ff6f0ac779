"""distill: a notebook-driven template that distils a teacher LLM into a small student with DSPy and Ray."""

from distill.config import Config, load_config
from distill.errors import ConfigError, DataError, DistillError

__all__ = ["Config", "ConfigError", "DataError", "DistillError", "load_config"]
__version__ = "0.1.0"
