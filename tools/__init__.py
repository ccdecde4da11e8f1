"""The top room: the `loraserve` command, the benchmark, soak and load generators, and the Ray
Serve front. Nothing below imports it."""
