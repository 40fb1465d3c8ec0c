"""`cambium dashboard`: one web page over every run of every system (runs list, curves, comparisons, per-system
panels), served by FastAPI on loopback. See docs/dashboard.md."""
