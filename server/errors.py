"""UserError: the one exception type for bad input (a setting, a file, an unreachable endpoint).

Library code raises it with a message that says what is wrong and what to do; it never exits.
Only the CLI entry point (clients/cli.py main) turns it into one line on stderr,
`flywheel COMMAND: error: MESSAGE`, and exit code 2. It lives at the bottom of the import graph
(server/ imports none of the other packages, and every package may import server/).
"""


class UserError(Exception):
    """Bad input from the user: printed by the CLI as `flywheel COMMAND: error: <message>`, exit code 2."""
