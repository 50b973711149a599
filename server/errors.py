"""UserError: the one exception type for bad input (a setting, a file, an unreachable endpoint).

Library code raises it with a message that says what is wrong and what to do; it never exits.
Only the CLI entry point (clients/cli.py main) turns it into one line on stderr,
`flywheel COMMAND: error: MESSAGE`, and exit code 2. It lives at the bottom of the import graph
(server/ imports none of the other packages, and every package may import server/).

`openai_error_body` is the other half: the one spelling of the OpenAI error envelope that every
error answer of our routes and middleware sends.
"""


class UserError(Exception):
    """Bad input from the user: printed by the CLI as `flywheel COMMAND: error: <message>`, exit code 2."""


def openai_error_body(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | int | None = None,
    param: str | None = None,
) -> dict:
    """The OpenAI API's error envelope: {"error": {"message", "type", "param", "code"}} (code: the status
    unless a string code is given, as vLLM's own errors do)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code or status}}
