"""`python -m pixcrawler`: the `pixcrawler` command line."""

from __future__ import annotations

from pixcrawler.cli import main

if __name__ == "__main__":
    main(prog_name="pixcrawler")
