"""The shared training machinery: loop, checkpoints, progress. It knows no experiment."""
