"""Node-side tests: runtimes, executor, emulation, lifecycle, profile."""
