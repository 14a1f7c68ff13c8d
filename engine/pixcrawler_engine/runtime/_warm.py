"""Preloaded by the workers' forkserver: one-time costs are paid once, before any fork.

Importing the decoder, Pillow's format plugins and pyarrow's lazy pandas hook takes most of a
second; done here, every worker forked afterwards starts warm.
"""

from __future__ import annotations

from pixcrawler_engine.runtime._worker import warm_up

warm_up()
