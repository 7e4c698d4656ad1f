"""Repository-wide pytest setup for the notebook runs (nbval)."""

import os

# An old (0.1) spelling of the library's API raises in the notebook kernels, which inherit this
# environment, so no chapter, solution or lab teaches a deprecated call.
os.environ.setdefault("MMALIGN_DEPRECATIONS", "error")


def pytest_collection_modifyitems(items):
    # nbval waits only 5 s for each output message after a cell finishes; a cell that streamed many
    # progress-bar updates on a busy 2-core machine can exceed that and fail spuriously.
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 120
