"""Model builders and checkpoint loading."""
