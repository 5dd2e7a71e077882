"""One module per command family; each exposes ``register(app)``.

The library is imported inside the commands, never at module level: every command module loads when
``sftkit`` starts, and ``sftkit --help``, ``list`` and ``show`` must start in ≤ 0.5 s (torch alone
takes seconds). That is the one reason for the function-level imports in these modules.
"""
