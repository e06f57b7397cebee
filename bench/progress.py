"""Progress bars: tqdm's when they are wanted and tqdm is installed, else a silent stand-in, so
that a run with --no-progress (bench/gpu_suite.sh's) never needs tqdm."""
from __future__ import annotations

import sys


class _Silent:
    """The part of tqdm's interface the benchmarks use, doing nothing."""

    def __init__(self, iterable=None):
        self.iterable = () if iterable is None else iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(enabled: bool, iterable=None, **kwargs):
    """tqdm(iterable, **kwargs) when enabled and importable, else a silent bar."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            print("tqdm is not installed: no progress bars", file=sys.stderr)
        else:
            return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return _Silent(iterable)
