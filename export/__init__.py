"""edgeadapt export package."""
