"""Prefect flows over the DVC pipeline: ``mcf`` (every stage, for GPU work pools) and ``crop_dask``.

The flow files are not named after the ``mcf`` package on purpose: Prefect loads an entrypoint
``flows/<file>.py`` under the module name ``<file>`` with ``flows/`` first on ``sys.path``, so a
``flows/mcf.py`` would shadow the package for everything imported in the flow-run process.
"""
