"""`loraserve bench`: load generator, naive baseline, base-only limit, report and plot."""
