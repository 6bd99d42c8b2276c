"""Bottom layer shared by every package; imports nothing else of ours."""
