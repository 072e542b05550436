"""Prefect flows over the DVC pipeline: ``mcf`` (every stage, for GPU work pools), and ``fetch_dask``
and ``crop_dask`` (one stage fanned out over a Dask cluster, on ``dask_runner``'s task runner).

The flow files are not named after the packages they use on purpose: Prefect loads an entrypoint
``flows/<file>.py`` under the module name ``<file>`` with ``flows/`` first on ``sys.path``, so a
``flows/mcf.py`` (or ``flows/dask.py``) would shadow that package in the flow-run process.
"""
