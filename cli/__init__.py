"""The ``sftkit`` command line: a thin Typer + rich layer over ``sftkit`` and ``registry``."""
