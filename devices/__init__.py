"""edgeadapt devices package."""
