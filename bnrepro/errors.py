"""The one exception type that means "the user can fix this": the CLI prints it as one line, exit code 2."""


class UserError(Exception):
    """Bad input (recipe, option, data, output folder): reported as one line, never as a traceback."""
