"""Data sets: where they are found, how they are loaded, and how mini-batches are drawn."""
