"""Operations: the console, health and metrics, logging."""
