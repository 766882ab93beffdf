"""The command line: ``main`` holds argparse and dispatches each verb to a handler in ``commands`` (inventory,
prune, distill, quality) or ``deploy_commands`` (export, verify, bench). Handlers parse nothing themselves: they call
the library with explicit arguments and return ``(json_result, text)``.
"""
