"""Side-by-side benchmark of fastproxy against nginx and HAProxy (see docs/benchmarks.md)."""
