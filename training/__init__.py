"""edgeadapt training package."""
