"""Repository-wide pytest setup for the notebook runs (nbval)."""


def pytest_collection_modifyitems(items):
    # nbval waits only 5 s for each output message after a cell finishes; a cell that streamed many
    # progress-bar updates on a busy 2-core machine can exceed that and fail spuriously.
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 120
