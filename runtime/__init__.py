"""edgeadapt device runtime: torch-free inference, belief updates and task families.

Importing this package never imports torch (a test guards it).
"""

from __future__ import annotations

__version__ = "0.1.0"
RUNTIME_VERSION = __version__
