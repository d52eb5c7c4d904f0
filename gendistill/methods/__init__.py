"""One module per training objective."""
